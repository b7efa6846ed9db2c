"""The lecture's baseline: the next character from the current one alone (val loss about 2.5).

    python train.py config/bigram.py
"""
out_dir = "out-bigram"
dataset = "shakespeare_char"

model_type = "bigram"
block_size = 8
dropout = 0.0

batch_size = 32
max_iters = 3000
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 0
weight_decay = 0.0

eval_interval = 300
eval_iters = 200
log_interval = 100
