"""Train the bundled tiny GPT-2 (``gpt2-pydoc``) on Python's own docstrings, reproducibly, on a CPU.

    .venv/bin/python scripts/train_tiny_gpt2.py extract   # corpus -> src/prism_trt/data/tiny_gpt2/*.txt.gz
    .venv/bin/python scripts/train_tiny_gpt2.py train     # checkpoint + meta.json (about 10 minutes, 2 threads)

``extract`` reads the docstrings of CPython's standard library sources with ``ast`` (nothing is
imported or executed), in sorted path order, and splits them by module: a module whose path's
SHA-256 is 0 mod 20 goes to the held-out set, every other one to training. The two byte strings
are committed gzip-compressed (mtime 0) with their SHA-256, so ``train`` and every evaluation read
the same bytes on any Python version. The docstrings are PSF-licensed (LICENSE-PSF.txt beside them).

``train`` is deterministic on one machine (fixed seeds, one thread count, fixed step count; CPU
kernels may differ in the last bits elsewhere): windows of 128 bytes at positions drawn from a
seeded generator, AdamW with warm-up and cosine decay. It stores the weights in fp16 (prism-trt's
internal layout) and records in meta.json the held-out loss and next-byte accuracy of *those*
weights, loaded back through ``load_text_model("gpt2-pydoc")`` and evaluated in fp32.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_trt.data.text_corpus import (
    CHECKPOINT_FILE,
    HELDOUT_FILE,
    IGNORE,
    META_FILE,
    TINY_GPT2_DIR,
    TRAIN_FILE,
    TextWindows,
    read_corpus,
)
from prism_trt.model.text_adapters import TEXT_CONFIGS, create_hf_text, from_hf, load_pretrained_text, text_config

NAME = "gpt2-pydoc"
HELDOUT_EVERY = 20  # about 5 % of the modules are held out
MIN_DOCSTRING = 40  # shorter ones are mostly "Return x." boilerplate
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


def _docstrings(tree: ast.AST) -> list[str]:
    """Module, class and function docstrings in source order (a depth-first walk)."""
    found = []
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc and len(doc) >= MIN_DOCSTRING:
            found.append(doc)
    for child in ast.iter_child_nodes(tree):
        found.extend(_docstrings(child))
    return found


def extract(out: Path, max_train_bytes: int) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(stdlib).parts))
    train, heldout, seen = [], [], set()
    train_modules = heldout_modules = 0
    for path in files:
        relative = path.relative_to(stdlib).as_posix()
        try:
            docs = _docstrings(ast.parse(path.read_bytes(), filename=relative))
        except (SyntaxError, ValueError):
            continue
        docs = [d for d in docs if d not in seen]  # exact duplicates (inherited boilerplate) once only
        seen.update(docs)
        if not docs:
            continue
        held = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0
        (heldout if held else train).extend(docs)
        heldout_modules += held
        train_modules += not held
    # One document per docstring, separated by a blank line; ASCII-only keeps bytes == characters.
    def encode(docs: list[str]) -> bytes:
        return "".join(d + "\n\n" for d in docs).encode("ascii", errors="replace")

    train_bytes, heldout_bytes = encode(train)[:max_train_bytes], encode(heldout)
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": f"docstrings of the CPython {platform.python_version()} standard library "
                        f"({len(files)} .py files outside tests), extracted with ast",
              "licence": "PSF-2.0 (LICENSE-PSF.txt)", "heldout_rule": f"sha256(module path) % {HELDOUT_EVERY} == 0",
              "min_docstring_chars": MIN_DOCSTRING, "modules": {"train": train_modules, "heldout": heldout_modules},
              "files": {}}
    for name, data in ((TRAIN_FILE, train_bytes), (HELDOUT_FILE, heldout_bytes)):
        (out / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        record["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    shutil.copyfile(stdlib / "LICENSE.txt", out / "LICENSE-PSF.txt")
    (out / "corpus.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def evaluate(model, data: bytes, seq_len: int, batch_size: int = 64) -> dict:
    """Mean next-byte cross-entropy (nats) and accuracy over every target of the held-out text."""
    loss_sum, correct, total = 0.0, 0, 0
    for ids, mask, targets in TextWindows(data, seq_len).batches(batch_size):
        logits = model(ids, mask)
        valid = targets != IGNORE
        loss_sum += float(F.cross_entropy(logits[valid], targets[valid], reduction="sum"))
        correct += int((logits.argmax(-1)[valid] == targets[valid]).sum())
        total += int(valid.sum())
    return {"loss": loss_sum / total, "accuracy": correct / total, "correct": correct, "targets": total}


def train(out: Path, steps: int, batch: int, lr: float, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    config = text_config(NAME)
    seq_len = config.n_positions
    data = torch.frombuffer(bytearray(read_corpus(TRAIN_FILE, out, verify=False)), dtype=torch.uint8).long()
    model = from_hf(create_hf_text(config, seed=seed), NAME).train()  # GPT-2's own init (std 0.02)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    history, started, running = [], time.time(), None
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        chunk = data[starts[:, None] + offsets]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 100 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(value, 4), "smoothed": round(running, 4),
                            "seconds": round(time.time() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
    seconds = time.time() - started
    state = {key: value.detach().to(torch.float16).contiguous() for key, value in model.state_dict().items()}
    torch.save(state, out / CHECKPOINT_FILE)
    corpus = json.loads((out / "corpus.json").read_text())
    meta = {"model": NAME, "config": TEXT_CONFIGS[NAME][1], "storage": "fp16 state_dict, prism-trt PrismText layout",
            "corpus": corpus,
            "training": {"command": f"python scripts/train_tiny_gpt2.py train --steps {steps} --batch {batch} "
                                    f"--lr {lr} --seed {seed} --threads {threads}",
                         "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
                         "threads": threads, "optimizer": "AdamW(0.9, 0.95), wd 0.1 on matrices, 5 % warm-up, cosine "
                                                          "to 10 %, grad clip 1.0",
                         "tokens_seen": steps * batch * seq_len, "seconds": round(seconds, 1),
                         "final_train_loss_smoothed": round(running, 4), "history": history,
                         "python": platform.python_version(), "torch": torch.__version__,
                         "transformers": sys.modules["transformers"].__version__}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # What the tests check: the stored (fp16) weights, loaded the normal way, evaluated in fp32.
    loaded = load_pretrained_text(NAME, out / CHECKPOINT_FILE)
    meta["heldout_eval"] = {"seq_len": seq_len, "windows": len(TextWindows(read_corpus(HELDOUT_FILE, out), seq_len)),
                            **evaluate(loaded, read_corpus(HELDOUT_FILE, out), seq_len)}
    meta["checkpoint_sha256"] = hashlib.sha256((out / CHECKPOINT_FILE).read_bytes()).hexdigest()
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["extract", "train"])
    parser.add_argument("--out", type=Path, default=TINY_GPT2_DIR)
    parser.add_argument("--max-train-bytes", type=int, default=2_000_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "extract":
        print(json.dumps(extract(args.out, args.max_train_bytes), indent=2))
    else:
        meta = train(args.out, args.steps, args.batch, args.lr, args.seed, args.threads)
        print(json.dumps(meta["heldout_eval"], indent=2))


if __name__ == "__main__":
    main()
