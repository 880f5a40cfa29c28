"""The bundled SmolLM2-135M-Instruct (GGUF Q4_1) against llama.cpp and transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mer
from mer.models.sources import resolve_model
from tests.support import llamacpp
from tests.support.hf_models import rel_err

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years, "
    "presses were operating in more than two hundred European cities, and the cost of books fell "
    "so sharply that reading, once the privilege of monks and nobles, spread among merchants and",
    "To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven "
    "grams of dried yeast and about three hundred and fifty millilitres of warm water. Knead the "
    "dough for ten minutes until it is smooth, then leave it to rise in a warm place until "
    "it has doubled in size, which usually takes",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light "
    "energy into chemical energy. Chlorophyll absorbs mostly blue and red light, and the energy is "
    "used to split water molecules, releasing oxygen as a by-product. The sugars produced are "
    "stored as starch or used to build cellulose, and together they",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in '
    "range(n):\n        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n    if n < 2:\n        "
    "return False\n    for d in range(2, int(n ** 0.5) + 1):\n",
    "Dear Ms. Alvarez,\n\nThank you for your letter of 12 March regarding the delayed shipment of "
    "order 4471. I have looked into the matter with our warehouse team, and I am sorry to report "
    "that the parcel was sent to an old address. We have now arranged for "
    "a courier to collect the parcel tomorrow morning and",
    "The mitochondrion is often called the powerhouse of the cell. It has its own small circular "
    "genome, inherited almost always from the mother, and it produces most of the cell's supply "
    "of adenosine triphosphate through oxidative phosphorylation. Scientists believe that "
    "mitochondria were once free-living bacteria, and that about two billion years ago",
    "In 1969 the Apollo 11 mission carried Neil Armstrong, Buzz Aldrin and Michael Collins to the "
    "Moon. Armstrong and Aldrin spent about two and a half hours walking on the surface, collecting "
    "samples and setting up experiments, while Collins remained in orbit aboard the command module "
    "named Columbia. After returning to Earth, the three astronauts",
    "Q: What is the difference between weather and climate?\nA: Weather describes the conditions "
    "of the atmosphere over a short period, such as a day or a week, while climate is the average "
    "of those conditions over thirty years or more.\nQ: Why do seasons change?\nA: The "
    "seasons change on Earth mainly because",
    "Here is a list of tips for learning a new language: practise a little every day rather than "
    "a lot once a week; listen to podcasts and music; label objects around your home; find a "
    "conversation partner; and do not be afraid of making mistakes, because "
    "every mistake you notice and correct teaches you something new that you",
    "The old lighthouse keeper climbed the one hundred and twelve steps every evening at sunset. "
    "From the top he could see the whole bay, the fishing boats returning to harbour and, on clear "
    "nights, the faint lights of the town on the far shore. One stormy night in November, "
    "as the wind howled around the tower, he noticed that",
]
CONTINUATION = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [
        {"role": "user", "content": "Give me a number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another one, please."},
    ],
]


@pytest.fixture(scope="module")
def path():
    return resolve_model(None)


@pytest.fixture(scope="module")
def model(path):
    return mer.load_model(path, activations="f32")


@pytest.fixture(scope="module")
def llm(path):
    return llamacpp.load(path, n_ctx=512)


def test_prompts_tokenize_like_llamacpp(model, llm):
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True)
        assert len(ids) >= 64


def test_chat_prompts_identical_to_llamacpp(model, llm):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    for messages in CHATS:
        text = formatter(messages=messages).prompt
        assert model.tokenizer.render_chat(messages) == text
        assert model.tokenizer.encode_chat(messages) == llm.tokenize(
            text.encode(), add_bos=False, special=True
        )


@pytest.mark.parametrize("activations", ["f32", "q8"])
def test_teacher_forced_agreement_with_llamacpp(model, path, llm, activations):
    # q8: every product is llama.cpp's own (tests/kernels/test_q8_activations.py), yet the
    # agreement is no closer than f32's: what remains lies outside the matrix products
    if activations == "q8":
        model = mer.load_model(path, activations="q8")
        assert {w.kind for w in model.weights.layers[0].matrices()} == {"q4_1x16"}
        assert model.weights.lm_head.kind == "q8_0x16"
    tops, kls = [], []
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        seq = ids + llamacpp.greedy(llm, ids, CONTINUATION)
        top1, kl = llamacpp.agreement(model.logits(seq), llamacpp.logits(llm, seq))
        tops.append(top1)
        kls.append(kl)
    print(
        f"SmolLM2 ({activations}) vs llama.cpp: top-1 {np.mean(tops):.4f}, "
        f"mean KL {np.mean(kls):.5f}"
    )
    assert np.mean(tops) >= 0.97
    assert np.mean(kls) <= 0.01


def test_matches_transformers_on_dequantized_file(model, path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for text in PROMPTS[:3]:
        ids = model.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        assert rel_err(model.logits(ids), ref) <= 1e-3
