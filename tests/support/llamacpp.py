"""llama.cpp as a reference: its Python binding, its HF→GGUF converter and its quantizer."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tarfile
from pathlib import Path

import llama_cpp
import numpy as np

SDIST = "llama-cpp-python==" + llama_cpp.__version__
FTYPES = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    # experts in MXFP4, the other matrices in Q8_0 (as gpt-oss is published)
    "mxfp4": llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
}


def converter_script(cache: Path) -> Path:
    """convert_hf_to_gguf.py from the source distribution of the installed binding.

    The script ships only in the sdist; it is downloaded once into `cache`.
    """
    found = sorted(cache.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            SDIST,
            "-d",
            str(cache),
        ],
        check=True,
    )
    archive = next(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        wanted = (
            "/vendor/llama.cpp/convert_hf_to_gguf.py",
            "/vendor/llama.cpp/conversion/",
            "/vendor/llama.cpp/gguf-py/",
        )
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
        tar.extractall(cache, members=members, filter="data")
    return next(cache.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def chat_template(cache: Path, name: str) -> str:
    """A model's chat template as llama.cpp's sources keep it (models/templates/NAME.jinja,
    copied from the model's own repository), read from the source distribution in `cache`."""
    converter_script(cache)  # downloads the source distribution once
    archive = next(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        member = next(
            m for m in tar.getmembers() if m.name.endswith(f"/models/templates/{name}.jinja")
        )
        return tar.extractfile(member).read().decode()


def convert(script: Path, hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """llama.cpp's own conversion of a Hugging Face directory to GGUF."""
    subprocess.run(
        [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def gguf_files(hf_dir: Path, root: Path, cache: Path, kinds: list[str]) -> dict[str, Path]:
    """{kind: path}: `hf_dir` converted to F16 GGUF by llama.cpp's converter (the script
    fetched into `cache`), then quantized by llama.cpp to each of `kinds` after "f16"."""
    script = converter_script(cache)
    paths = {"f16": convert(script, hf_dir, root / "model-f16.gguf", "f16")}
    for kind in kinds:
        if kind != "f16":
            paths[kind] = quantize(paths["f16"], root / f"model-{kind}.gguf", kind)
    return paths


def quantize(src: Path, dst: Path, kind: str) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) with the given file type."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return dst


def load(path: Path, n_ctx: int = 512) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=512, verbose=False
    )


def logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """float32 [n, V] logits at every position of a fresh evaluation of `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: llama_cpp.Llama, ids: list[int], n_new: int) -> list[int]:
    """n_new greedy tokens from llama.cpp (end-of-sequence tokens included, not stopped on)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(mer_logits: np.ndarray, ref_logits: np.ndarray) -> tuple[float, float]:
    """(share of positions with equal top-1, mean KL(mer || reference) in nats)."""
    top1 = float(np.mean(mer_logits.argmax(-1) == ref_logits.argmax(-1)))
    lp, lq = log_softmax(mer_logits), log_softmax(ref_logits)
    kl = float(np.mean((np.exp(lp) * (lp - lq)).sum(-1)))
    return top1, kl


def teacher_forced(model, llm: llama_cpp.Llama, prompts, n_new: int) -> tuple[list, list]:
    """(top-1 agreement, mean KL) of mer `model` against `llm` per prompt, over each prompt
    followed by llama.cpp's own `n_new` greedy tokens."""
    tops, kls = [], []
    for ids in prompts:
        seq = ids + greedy(llm, ids, n_new)
        top1, kl = agreement(model.logits(seq), logits(llm, seq))
        tops.append(top1)
        kls.append(kl)
    return tops, kls
