"""The lecture's exact recipe, for a GPU: 6 layers, 6 heads, n_embd 384, block_size 256,
batch 64, dropout 0.2, learning rate 3e-4, 5000 iterations (val loss about 1.48 after
~15 minutes on an A100). On a CPU this takes many hours: use config/shakespeare_char.py.

    python train.py config/shakespeare_char_lecture.py
"""
out_dir = "out-lecture"
dataset = "shakespeare_char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
attn_dropout = 0.2

batch_size = 64
max_iters = 5000
learning_rate = 3e-4
min_lr = 3e-4
warmup_iters = 0
weight_decay = 0.01
beta2 = 0.999
grad_clip = 0.0

eval_interval = 500
eval_iters = 200
log_interval = 10
