"""The lecture's GPT, sized for 30 minutes on a 2-core CPU.

Same architecture as the lecture (token + position embeddings, 6 pre-LayerNorm Blocks of
multi-head self-attention and a ReLU MLP, final LayerNorm, lm_head), narrower and with a
shorter context: 6 layers, 4 heads of 32, n_embd 128, block_size 128 (1.2M parameters).
In 30 minutes it sees about 20M characters (20 passes over the training text) and starts
to overfit near the end; dropout 0.1 (on the residual branches only, so attention keeps
SDPA's fused kernel) learned more slowly and was behind at every eval up to step 3000.
The lecture's exact recipe, for a GPU, is config/shakespeare_char_lecture.py.

    python train.py config/shakespeare_char.py
"""
out_dir = "out"
dataset = "shakespeare_char"

n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0

batch_size = 32
max_iters = 5000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100

eval_interval = 500
eval_iters = 20
log_interval = 50
