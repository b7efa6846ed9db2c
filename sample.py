"""Generate text from a trained checkpoint.

    python sample.py --out_dir out
    python sample.py --out_dir out --start "ROMEO:" --num_samples 3 --max_new_tokens 300
    python sample.py --out_dir out --start FILE:prompt.txt --temperature 0.8 --top_k 40 --seed 7
    python sample.py --out_dir out --start "ROMEO:" --attention attn.png --max_new_tokens 0
    python sample.py --out_dir out --lens "ROMEO:"            # the next character, layer by layer
    python sample.py --out_dir out --lens "ROMEO:" --lens_at 2
    python sample.py --help

Loads out_dir/best.pt (the best val loss) if present, else out_dir/ckpt.pt, with
torch.load(weights_only=True): the checkpoint alone rebuilds the model and its vocabulary.
It says on stderr which checkpoint it loaded (its step and best val loss); one sample
streams to stdout character by character, several are generated in one batch, and stdout
holds the text alone.
A generation too big for the memory there is (--num_samples x --max_new_tokens: the KV
cache, the ids, the text) is refused before it starts, with both figures (chargpt/memory.py).

--decode_dtype=auto (the default) runs the one-character decode steps in whichever of
float32, float16, bfloat16 and int8 generates --max_new_tokens characters fastest for this
model and --num_samples on this machine: the first time, a few steps of each are timed (a
fraction of a second) and the times are cached in ~/.cache/chargpt/decode_dtype.json (see
chargpt/engine.py; delete the file to measure again).

--attention FILE.png draws, before sampling, the attention weights of every layer and head
for the prompt as a grid of heatmaps (rows are layers, columns heads; row t of a heatmap is
how much the character at t takes from each earlier one, so everything above the diagonal
is empty). It needs matplotlib; --max_new_tokens 0 gives the picture alone.

--lens TEXT prints the logit lens and exits: the five likeliest characters after TEXT (or
after its character at --lens_at), read from the residual stream after the embeddings and
after each Block through the final LayerNorm and lm_head (chargpt/lens.py), one row per
layer; the last row is the model's own guess. Inside the text, the real next character's
probability at each layer too. The playground shows the same for every character.

On a CPU, --threads=0 (the default) generates on the cores other programs leave free, as
train.py does (chargpt/machine.py says why); it says so on stderr when that is fewer than all.
"""

import math
import sys
import warnings

import torch

from chargpt.checkpoint import describe, find_checkpoint, load_checkpoint, model_from_checkpoint
from chargpt.config import HelpRequested, SampleConfig, parse
from chargpt.engine import generate_tokens
from chargpt.lens import lens_table
from chargpt.machine import Threads, resolve_device
from chargpt.memory import check_sampling_memory


def draw_attention(maps, chars, path):
    """Save maps (n_layer, n_head, T, T) as a grid of heatmaps whose ticks are the characters.

    Every character is labelled up to LABELLED_CHARS (the heatmaps grow to fit them); a
    longer prompt labels every k-th and says so in the title. Above the diagonal (what a
    character may not look at) stays blank, not the colour of weight 0."""
    import numpy as np
    from matplotlib.figure import Figure  # the object API: no GUI backend needed

    n_layer, n_head, T, _ = maps.shape
    labels = [{"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch) for ch in chars]
    size = max(2.5, min(T, LABELLED_CHARS) / LABELS_PER_INCH + 0.8)  # inches per heatmap
    step = max(1, math.ceil(T / LABELLED_CHARS))
    ticks = list(range(0, T, step))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T): the masked upper triangle
    fig = Figure(figsize=(n_head * size + 1.5, n_layer * size + 0.8), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            weights = np.ma.masked_array(maps[layer, head].float().cpu().numpy(), mask=future)  # (T, T)
            image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_facecolor("white")  # what the mask leaves out
            ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7, rotation=90 if step > 1 else 0)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
    fig.supxlabel("attended to (key)")
    fig.supylabel("attending (query)")
    if step > 1:
        fig.suptitle(f"{T} characters, one label every {step}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a character missing from the font is drawn as a box, no need to say so
        fig.savefig(path, dpi=100)
    return fig


LABELLED_CHARS = 96  # characters labelled one by one; a longer prompt labels every k-th
LABELS_PER_INCH = 9  # at fontsize 7


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        (config,), _ = parse(argv, [SampleConfig()], "sample.py [--key=value ...]", config_file=False)
        config.validate()
        prompt = config.prompt()
        device = resolve_device(config.device)
        # on a CPU, the cores other programs leave free: what they take is looked at from here to the first character
        threads = Threads(config.threads, log=lambda message: print(message, file=sys.stderr)) if device == "cpu" else None
        path = find_checkpoint(config.out_dir)
        checkpoint = load_checkpoint(path, device)
        model, tokenizer = model_from_checkpoint(checkpoint, device, path)
        loaded = describe(path, checkpoint, model)
        del checkpoint
        if config.lens:
            lines = lens_lines(model, tokenizer, config, path)
            print(loaded, file=sys.stderr)
            print("\n".join(lines))
            return 0
        try:
            prompt_ids = tokenizer.encode(prompt)
        except ValueError as e:
            raise ValueError(f"--start: {e}") from None
        check_sampling_memory(config, model, len(prompt_ids), device)
        if config.attention:
            write_attention(model, tokenizer, prompt_ids, config.attention, path)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    # what the text comes from, on stderr once every check has passed: stdout is the text alone
    print(loaded, file=sys.stderr)
    if threads is not None:
        threads.adjust(look=LOOK_SECONDS)
    print_samples(generate_tokens(model, prompt_ids, config), prompt, tokenizer, config.num_samples)
    return 0


LOOK_SECONDS = 0.1  # of other programs' CPU time before sampling (20 clock ticks on 2 cores), waited for if loading was quicker


def write_attention(model, tokenizer, prompt_ids, png, path):
    """--attention: the attention of every layer and head over the prompt, drawn into png."""
    if not hasattr(model, "attention_maps"):
        raise ValueError(f"--attention: {path} holds a {model.config.model_type} model, which has no attention")
    # positions are learned up to block_size: the picture shows the last block_size characters
    shown = prompt_ids[-model.config.block_size :]
    device = next(model.parameters()).device
    maps = model.attention_maps(torch.tensor([shown], dtype=torch.long, device=device))  # (n_layer, nh, T, T)
    draw_attention(maps, tokenizer.decode(shown), png)
    cut = " (the last block_size of the prompt)" if len(shown) < len(prompt_ids) else ""
    print(
        f"wrote {png}: attention of {plural(maps.shape[0], 'layer')} x {plural(maps.shape[1], 'head')} "
        f"over {plural(len(shown), 'character')}{cut}",
        file=sys.stderr,
    )


def lens_lines(model, tokenizer, config, path):
    """--lens: the lens table of --lens's text at --lens_at, as lines."""
    if not hasattr(model, "blocks"):
        raise ValueError(f"--lens: {path} holds a {model.config.model_type} model, which has no layers to look through")
    text = config.lens_text()
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise ValueError(f"--lens: {e}") from None
    if not -len(ids) <= config.lens_at < len(ids):
        raise ValueError(
            f"--lens_at={config.lens_at}: the text has {len(ids)} characters (0..{len(ids) - 1}, or -1 for the last)"
        )
    return lens_table(model, tokenizer, ids, config.lens_at % len(ids))


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def print_samples(tokens, prompt, tokenizer, num_samples):
    """One sample streams character by character; several are printed one after the other."""
    if num_samples == 1:
        sys.stdout.write(prompt)
        for token in tokens:  # stream: each character as soon as it exists
            sys.stdout.write(tokenizer.decode([token.item()]))
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        columns = [[] for _ in range(num_samples)]
        for token in tokens:  # (N,)
            for column, t in zip(columns, token.tolist()):
                column.append(t)
        for i, column in enumerate(columns):
            sys.stdout.write(("" if i == 0 else "---------------\n") + prompt + tokenizer.decode(column) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
