"""Stage 7, LayerNorm: each branch reads a normalised copy of x (pre-norm), and a final
LayerNorm comes before lm_head. This is the finished architecture, small: the lecture got
val loss 2.06; stage 8 adds dropout and scales it up.

    python train.py config/lecture/7_layer_norm.py
"""

out_dir = "out-lecture/7_layer_norm"
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

# the finished Block: pre-LayerNorm, residual connections, projections, FeedForward 4x
n_layer = 3
n_head = 4
n_embd = 32
ffwd_mult = 4
residual = True
proj = True
layer_norm = True
