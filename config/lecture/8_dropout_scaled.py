"""Stage 8, dropout and the scale-up: the lecture's finished recipe. Dropout 0.2 (on the
attention weights and on each branch's output) keeps a bigger model from memorising the
text: 6 Blocks of 6 heads, n_embd 384, block_size 256, batch 64, learning rate 3e-4, 5000
steps (10.8M parameters). The lecture: val loss 1.48 after ~15 minutes on an A100; on a
CPU this takes many hours (config/shakespeare_char.py gets there on 2 cores).

    python train.py config/lecture/8_dropout_scaled.py
"""

out_dir = "out-lecture/8_dropout_scaled"
dataset = "shakespeare_char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
attn_dropout = 0.2

# the lecture's training loop: AdamW with PyTorch's defaults, a constant learning rate, no clipping
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
