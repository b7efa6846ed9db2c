"""The lecture's model: 6 layers, 6 heads, n_embd 384, block_size 256, batch 64, dropout 0.2.

    python train.py config/shakespeare_char.py
"""
out_dir = "out"
dataset = "shakespeare_char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2

batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99

eval_interval = 250
eval_iters = 200
log_interval = 10
