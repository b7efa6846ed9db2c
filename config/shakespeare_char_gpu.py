"""Aims at the lecture's 1.48 on one modern GPU in under 30 seconds of the whole command: a
recipe reasoned from the CPU recipes' measurements (docs/results.md). It has NOT run on a GPU yet:
its numbers are reasoned, not measured. `python bench.py gpu` runs it and reports what it
gets; put the figures here when it has.

What the CPU recipes learned, kept: Muon for the Blocks' matrices, warmup-stable-decay to 0
over the last 30%, rotary positions, QK-norm, squared ReLU, no biases, every window once per
epoch, dropout on the residual branches only (so attention keeps its fused kernel), and a
step count with a time budget as a cap: a slower GPU stops at the cap and still ends its
decay on time (the run's last lines then say how many of the steps it bought).

What a GPU changes, and why these numbers:
- A batch of 64 x 256 = 16,384 tokens, four times config/shakespeare_char.py's 32 x 128: a
  small model's step on a GPU is expected to cost about its kernel launches, not its
  arithmetic, so more tokens per step come nearly free. The learning rates are that recipe's scaled by the
  square root of the batch's growth (Muon 0.01 -> 0.02, AdamW 2e-3 -> 4e-3).
- 6 Blocks of n_embd 256 (4 heads of 64, 4.8M parameters) instead of 128: twice the width
  learns more per step at about the same cost per step. The lecture's 384 would cost more
  per step than the launches do on an A100 (nanoGPT's equivalent takes about 23 ms a step
  there, compiled); 256 is expected at 8-15 ms a step.
- 1,500 steps, 25M tokens: config/shakespeare_char.py reached 1.4625 at step 2,500 of 4,096
  tokens (10M); a step of four times the tokens should need fewer steps, not a quarter as
  many. 25 times the training text, so dropout 0.1 stays.
- A cap of 24 seconds, the run's evals, checkpoints and samples.txt included: at 8-15 ms a
  step the 1,500 steps take 12-23 s; Python's start, `import torch` and CUDA's start come
  on top (2-4 s).
- No --compile: torch.compile's first compile of a model takes tens of seconds, about the
  whole budget, before the first step; in a longer run it may pay (not measured).
- --dtype=auto: bfloat16 autocast and TF32 on an A100 or newer (float16 with loss scaling
  on a T4 or V100, which are slower: expect more than 30 s for 1.48 there, or a higher loss).

    python train.py config/shakespeare_char_gpu.py
    python bench.py gpu                                            # runs it, with the other GPU checks
    python train.py config/shakespeare_char_gpu.py --max_iters=4000 --time_budget=2   # longer, a better model
"""

out_dir = "out-gpu"
dataset = "shakespeare_char"

n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.1
position = "rotary"
qk_norm = True
activation = "relu2"
bias = False

max_iters = 1500
time_budget = 0.4  # minutes (24 s, evals and checkpoints included): a cap for a slower GPU
optimizer = "muon"
muon_lr = 0.02
batch_size = 64
learning_rate = 4e-3  # AdamW's, for the embeddings, lm_head and LayerNorm gains
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 0.0
warmup_iters = 100
data_order = "epoch"

eval_interval = 250
eval_iters = 20
eval_sample_chars = 100
log_interval = 50
