"""The embedded default model, SmolLM2-135M-Instruct from its GGUF file: real answers."""

from __future__ import annotations

import pytest

from flover import LLM, SamplingParams
from flover.weights import default_model_path

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_concurrency=4, max_seq_len=256)


def test_embedded_model_answers_a_factual_question(llm):
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]], GREEDY)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, not by length


def test_fused_chats_answer_like_lone_ones(llm):
    questions = ["What is the capital of Germany?", "What is the capital of Japan?",
                 "What is the largest ocean on Earth?"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    fused = llm.chat(convs, GREEDY)
    alone = [llm.chat([c], GREEDY)[0] for c in convs]
    assert "Berlin" in fused[0].text and "Tokyo" in fused[1].text
    assert "Pacific" in fused[2].text
    assert [o.token_ids for o in fused] == [o.token_ids for o in alone]


def test_gguf_tokenizer_matches_transformers_conversion(llm):
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world 123, café  naïve\n\n<|im_start|>user\nWhat is 2+2?<|im_end|>",
                 "  It's 1999!  \t tabs", "日本語 emojis 🚀🚀 x"]:
        ids = llm.tokenizer.encode(text)
        assert ids == ref.encode(text)
        assert llm.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_marks_the_assistant_turn(llm):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_gguf_generates_like_transformers(llm):
    """The GGUF file is converted once into an HF checkpoint; transformers agrees on it."""
    transformers = pytest.importorskip("transformers")
    import torch

    from flover.weights import convert_gguf

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(convert_gguf(default_model_path())), dtype=torch.float32).eval()
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    ids = llm.tokenizer.encode(chat, add_special_tokens=False)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    ours = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))
    assert ours[0].token_ids == theirs[0, len(ids):].tolist()
