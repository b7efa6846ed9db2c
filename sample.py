"""Generate text from a trained checkpoint.

    python sample.py --out_dir out
    python sample.py --out_dir out --start "ROMEO:" --num_samples 3 --max_new_tokens 300
    python sample.py --out_dir out --start FILE:prompt.txt --temperature 0.8 --top_k 40 --seed 7
    python sample.py --out_dir out --start "ROMEO:" --attention attn.png --max_new_tokens 0
    python sample.py --help

Loads out_dir/best.pt (the best val loss) if present, else out_dir/ckpt.pt, with
torch.load(weights_only=True): the checkpoint alone rebuilds the model and its vocabulary.
One sample streams to stdout character by character; several are generated in one batch.
A generation too big for the memory there is (--num_samples x --max_new_tokens: the KV
cache, the ids, the text) is refused before it starts, with both figures (memory.py).

--decode_dtype=auto (the default) runs the one-character decode steps in whichever of
float32, float16, bfloat16 and int8 generates --max_new_tokens characters fastest for this
model and --num_samples on this machine: the first time, a few steps of each are timed (a
fraction of a second) and the times are cached in ~/.cache/chargpt/decode_dtype.json (see
decode_dtype.py; delete the file to measure again).

--attention FILE.png draws, before sampling, the attention weights of every layer and head
for the prompt as a grid of heatmaps (rows are layers, columns heads; row t of a heatmap is
how much the character at t takes from each earlier one, so everything above the diagonal
is empty). It needs matplotlib; --max_new_tokens 0 gives the picture alone.
"""

import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from configurator import HelpRequested, knob, parse
from decode_dtype import DECODE_DTYPES, resolve_decode_dtype
from memory import check_fits, sampling_bytes
from train import resolve_device


@dataclass
class SampleConfig:
    out_dir: str = knob("out", "folder with best.pt or ckpt.pt")
    start: str = knob("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = knob(1, "samples to generate, in one batch")
    max_new_tokens: int = knob(500, "characters to generate per sample")
    temperature: float = knob(0.8, "1.0 samples the model's distribution, lower is more conservative, 0 is greedy")
    top_k: int = knob(200, "sample among the k most likely characters only (0: all)")
    top_p: float = knob(1.0, "sample among the most likely characters whose probability adds up to top_p (1.0: all)")
    seed: int = knob(1337, "seed of the draw: the same seed gives the same text")
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, mps")
    kv_cache: bool = knob(True, "reuse the keys and values of earlier positions (False: rerun the whole context per character)")
    decode_dtype: str = knob("auto", "weights of the one-character decode steps with the cache: 'auto' (the fastest for this model, num_samples and max_new_tokens here: a few steps of each timed once, then cached in ~/.cache/chargpt), float32, float16, bfloat16 or int8")
    attention: str = knob("", "draw the attention weights of every layer and head for the prompt into this PNG file (needs matplotlib)")

    def validate(self):
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be 0 or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.decode_dtype not in ("auto", *DECODE_DTYPES):
            raise ValueError(f"--decode_dtype must be auto, float32, float16, bfloat16 or int8, got {self.decode_dtype!r}")
        if self.attention:
            folder = os.path.dirname(os.path.abspath(self.attention))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--attention={self.attention}: the folder {folder} does not exist")
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--attention needs matplotlib, which is not installed (pip install matplotlib)") from None


# bytes per weight of the decode steps' copy of the weights; float32 decodes with the model's
# own, and auto (which times the candidates only once the check has passed) is counted as the
# biggest copy it may pick
DECODE_COPY_BYTES = {"float32": 0, "float16": 2, "bfloat16": 2, "int8": 1, "auto": 2}


def memory_parts(config, model, prompt_len):
    """{part: bytes} that generating with these settings adds to the loaded model (memory.py)."""
    decode_bytes = model.num_params() * DECODE_COPY_BYTES[config.decode_dtype]
    return sampling_bytes(model.config, config.num_samples, prompt_len, config.max_new_tokens, config.kv_cache, decode_bytes)


def check_memory(config, model, prompt_len, device):
    """Refuse a generation whose estimate exceeds the memory there is, before it starts
    (before decode dtype auto times anything, too), instead of being killed half-way by the
    OOM killer."""
    what = f"generating --num_samples={config.num_samples} x --max_new_tokens={config.max_new_tokens} characters"
    check_fits(memory_parts(config, model, prompt_len), device, what,
               {"generated ids": "use a smaller --max_new_tokens, or fewer --num_samples",
                "KV cache": "use fewer --num_samples (run sample.py several times with other --seed values)",
                "forward pass": "use fewer --num_samples (run sample.py several times with other --seed values)"})


def read_prompt(start):
    """The prompt text: start itself, or the contents of the file named by FILE:path."""
    if start.startswith("FILE:"):
        path = start[len("FILE:") :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--start=FILE:{path}: no such file")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    if not start:
        raise ValueError("--start is empty: the model needs at least one character to continue")
    return start


def generate_tokens(model, prompt_ids, config):
    """The new tokens for config (a SampleConfig), one (num_samples,) tensor at a time: the
    seeded draw that sample.py prints and serve.py streams, so the same settings give the
    same text in both."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * config.num_samples, dtype=torch.long, device=device)  # (N, T)
    generator = torch.Generator().manual_seed(config.seed)
    return model.generate(
        idx,
        config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=generator,
        kv_cache=config.kv_cache,
        decode_dtype=resolve_decode_dtype(config.decode_dtype, model, config.num_samples, config.max_new_tokens),
    )


def draw_attention(maps, chars, path):
    """Save maps (n_layer, n_head, T, T) as a grid of heatmaps whose ticks are the characters."""
    from matplotlib.figure import Figure  # the object API: no GUI backend needed

    n_layer, n_head, T, _ = maps.shape
    labels = [{"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch) for ch in chars]
    size = min(6.0, max(2.5, 0.15 * T + 1))  # inches per heatmap
    step = max(1, math.ceil(T / (size * 7)))  # a label for every character while they fit
    ticks = list(range(0, T, step))
    fig = Figure(figsize=(n_head * size + 1.5, n_layer * size + 0.8), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
    fig.supxlabel("attended to (key)")
    fig.supylabel("attending (query)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a character missing from the font is drawn as a box, no need to say so
        fig.savefig(path, dpi=100)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        (config,), _ = parse(argv, [SampleConfig()], "sample.py [--key=value ...]", config_file=False)
        config.validate()
        prompt = read_prompt(config.start)
        device = resolve_device(config.device)
        path = find_checkpoint(config.out_dir)
        model, tokenizer = model_from_checkpoint(load_checkpoint(path, device), device)
        try:
            prompt_ids = tokenizer.encode(prompt)
        except ValueError as e:
            raise ValueError(f"--start: {e}") from None
        check_memory(config, model, len(prompt_ids), device)
        if config.attention:
            if not hasattr(model, "attention_maps"):
                raise ValueError(f"--attention: {path} holds a {model.config.model_type} model, which has no attention")
            # positions are learned up to block_size: the picture shows the last block_size characters
            shown = prompt_ids[-model.config.block_size :]
            maps = model.attention_maps(torch.tensor([shown], dtype=torch.long, device=device))  # (n_layer, nh, T, T)
            draw_attention(maps, tokenizer.decode(shown), config.attention)
            print(
                f"wrote {config.attention}: attention of {maps.shape[0]} layers x {maps.shape[1]} heads "
                f"over {len(shown)} characters{' (the last block_size of the prompt)' if len(shown) < len(prompt_ids) else ''}",
                file=sys.stderr,
            )
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1

    tokens = generate_tokens(model, prompt_ids, config)
    if config.num_samples == 1:
        sys.stdout.write(prompt)
        for token in tokens:  # stream: each character as soon as it exists
            sys.stdout.write(tokenizer.decode([token.item()]))
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        columns = [[] for _ in range(config.num_samples)]
        for token in tokens:  # (N,)
            for column, t in zip(columns, token.tolist()):
                column.append(t)
        for i, column in enumerate(columns):
            sys.stdout.write(("" if i == 0 else "---------------\n") + prompt + tokenizer.decode(column) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
