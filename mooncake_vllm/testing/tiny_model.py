"""A tiny random-weight Llama and a locally trained BPE tokenizer: a model that needs no hub.

Tests, the demo and the benchmarks serve it with real vLLM engines. Two properties matter:
- GQA and several layers, so the KV layout exercises what real models do (KV heads < heads).
- Varied greedy output: with a default init every logit is near zero and greedy decoding
  repeats one token, which would make "P/D output equals single-instance output" prove
  nothing. Scaling the weights up makes the next token depend on the whole context.

`python -m mooncake_vllm.testing.tiny_model DIR` (or `mooncake-vllm tiny-model DIR`) writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # GQA: 4 query heads share each KV head
    max_position_embeddings: int = 4096
    seed: int = 1234
    # Multiplies the default init (std 0.02): large enough that logits separate clearly and
    # greedy decoding wanders across the vocabulary instead of repeating one token.
    weight_scale: float = 10.0


def _corpus_text() -> str:
    """English text that every CPython ships: the pydoc topic pages."""
    from pydoc_data import topics

    return "\n".join(str(v) for v in topics.topics.values())


def _train_tokenizer(out: Path, spec: TinyModelSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = out / "corpus.txt"
    corpus.write_text(_corpus_text(), encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _write_weights(out: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(spec.weight_scale)
            if name.endswith("lm_head.weight"):
                # Keep EOS unlikely so that answers run to max_tokens and comparisons are long.
                param[config.eos_token_id].mul_(0.0)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)


def make_tiny_model(path: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write the model to `path` (idempotent: an existing complete model is reused)."""
    spec = spec or TinyModelSpec()
    out = Path(path)
    stamp = out / "tiny_model_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: concurrent callers never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=out.parent))
    _train_tokenizer(tmp, spec)
    _write_weights(tmp, spec)
    (tmp / "tiny_model_spec.json").write_text(json.dumps(asdict(spec)))
    if out.exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race with an identical model
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """Where tests and the demo keep the model: MOONCAKE_VLLM_TINY_MODEL or a cache dir."""
    env = os.environ.get("MOONCAKE_VLLM_TINY_MODEL")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "mooncake-vllm" / "tiny-llama"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mooncake-vllm tiny-model", description=__doc__)
    parser.add_argument("path", nargs="?", default=str(default_model_dir()))
    args = parser.parse_args(argv)
    print(make_tiny_model(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
