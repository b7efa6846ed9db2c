"""A small recipe for a laptop CPU: val loss about 1.88 in minutes.

    python train.py config/shakespeare_char_cpu.py
"""
out_dir = "out"
dataset = "shakespeare_char"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0

batch_size = 12
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
lr_decay_iters = 2000

eval_interval = 250
eval_iters = 20
log_interval = 10
