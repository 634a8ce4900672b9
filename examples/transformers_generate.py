"""Greedy generation in Hugging Face transformers with this library as the attention backend, beside "sdpa".

    pip install torch==2.13.0 transformers          # the CPU wheel of torch
    swift build -c release                          # or: pip install "./bindings/python[transformers]"
    python3 examples/transformers_generate.py       # --help for the model size, prompt length, padding, threads

A small Llama-style model is built from a config with random weights (nothing is downloaded), twice with the
same weights: once with attn_implementation="sdpa" (transformers' default on CPU) and once with the name
flash_attention.transformers.register() returns. Both generate greedily from the same prompts, left-padded to
one length; the script checks that the tokens are identical and prints the time of the prompt (prefill) and
the decoding speed of each.
"""

import argparse
import copy
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bindings" / "python"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from flash_attention.transformers import register  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens of the longest prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="prompts; prompt b is shorter by b * --pad-step")
    parser.add_argument("--pad-step", type=int, default=100, help="left padding added per prompt")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch and library threads (0: every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    name = register(num_threads=args.threads)  # "fa_cpu": a name transformers accepts (no "flash" in it)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads_kv, max_position_embeddings=args.prompt + args.new_tokens)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name).eval()
    ours.load_state_dict(reference.state_dict())

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=generator)
    mask = torch.ones_like(ids)
    for b in range(args.batch):
        pad = min(b * args.pad_step, args.prompt - 1)
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    print(f"Llama config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.heads_kv} kv heads, "
          f"float32; {args.batch} prompts of {args.prompt} tokens (left padding {args.pad_step} per prompt), "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} torch threads")

    def generate(model, new_tokens):
        start = time.perf_counter()
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
        return tokens, time.perf_counter() - start

    results = {}
    for label, model in (("sdpa", reference), (name, ours)):
        with torch.no_grad():
            generate(model, 2)  # warm-up
            # Prefill = a generation of one token; decoding = what more tokens add, per token.
            prefill = min(generate(model, 1)[1] for _ in range(3))
            tokens, total = generate(model, args.new_tokens)
        decode_rate = args.batch * (args.new_tokens - 1) / max(total - prefill, 1e-9)
        results[label] = (tokens, prefill, decode_rate)
        print(f"{label:>8}: prefill {prefill * 1e3:8.1f} ms, decoding {decode_rate:7.1f} tokens/s "
              f"({args.new_tokens} tokens per prompt: {total:.2f} s)")
    same = torch.equal(results["sdpa"][0], results[name][0])
    print(f"greedy tokens identical: {same}")
    print(f"{name} vs sdpa: prefill time x{results[name][1] / results['sdpa'][1]:.2f}, "
          f"decoding speed x{results[name][2] / results['sdpa'][2]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
