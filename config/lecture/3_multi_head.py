"""Stage 3, multi-head attention: 4 heads of 8 side by side, their outputs concatenated, so
each head can look for something different. The lecture: val loss 2.28.

    python train.py config/lecture/3_multi_head.py
"""

out_dir = "out-lecture/3_multi_head"
dataset = "shakespeare_char"
dtype = "float32"
init = "pytorch"  # PyTorch's default initial weights, as in the lecture's video

# the lecture's training loop: AdamW with PyTorch's defaults, a constant learning rate, no clipping
batch_size = 32
block_size = 8
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-3
warmup_iters = 0
weight_decay = 0.01
beta2 = 0.999
grad_clip = 0.0
dropout = 0.0

eval_interval = 500
eval_iters = 200
log_interval = 100

# 4 Heads of 8, concatenated into lm_head
n_layer = 1
n_head = 4
n_embd = 32
ffwd_mult = 0
residual = False
proj = False
layer_norm = False
