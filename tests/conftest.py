"""Shared fixtures: a tiny random Llama with a real (tiny) BPE tokenizer and a ChatML template, saved as
an HF folder, so every code path that loads a backbone from settings runs unchanged in seconds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.settings import Settings
from experts.backbone import Backbone, load_backbone
from experts.quant import fbgemm_available

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "I have a headache and a fever since yesterday, what should I take?",
    "My order never arrived and the tracking number does not work.",
    "Should I pay off my credit card or invest in an index fund?",
    "Can my landlord keep my deposit for normal wear and tear?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()-",
    "Please reset my password, the app keeps crashing on login.",
    "What are the side effects of ibuprofen and how much can I take?",
    "Is a Roth IRA better than a 401k for someone in their twenties?",
    "My employer fired me after I asked for overtime pay, is that legal?",
]

DOMAIN_PROMPTS = {
    "medical": [
        "I have a bad headache and fever", "my throat hurts when i swallow", "what dose of ibuprofen is safe",
        "rash on my arm after new medication", "chest pain when I climb stairs", "my child has a cough and fever",
        "is my blood pressure 150 over 95 too high", "side effects of antibiotics", "I cannot sleep at night",
        "my knee is swollen after running", "how long does the flu last", "should I see a doctor for back pain",
    ],
    "finance": [
        "should I invest in index funds", "how do I improve my credit score", "roth ira or 401k",
        "pay off my mortgage early or invest", "what is a good savings rate", "how are dividends taxed",
        "best way to pay down credit card debt", "is it smart to refinance my loan", "how much to save for retirement",
        "what is an ETF", "budget for a family of four", "how do bonds work when interest rates rise",
    ],
}


def _build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = CORPUS + [p for prompts in DOMAIN_PROMPTS.values() for p in prompts]
    tok.train_from_iterator(texts * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 64) plus tokenizer: an HF folder like any other."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_settings(home: Path, backbone_dir: Path) -> Settings:
    """Settings for the tiny backbone; module-scoped fixtures build them from tmp_path_factory."""
    return Settings(
        home=home,
        backbone=str(backbone_dir),
        router_layers=[1, 2],
        router_sentence_encoder="",
        lora_rank=4,
        lora_alpha=8,
        max_prompt_tokens=256,
        max_new_tokens=64,
        # the tiny random model's logits are near ties everywhere: 4- and 8-bit rounding flips greedy tokens that
        # tests compare with transformers' generate, so unit tests serve the fp16 copy (within 2e-4 of fp32) where
        # there is one; int8/int4 equivalence within their tolerances is tests/test_quant.py's
        backbone_quant="fp16" if fbgemm_available() else "none",
    )


@pytest.fixture
def settings(tmp_path: Path, tiny_backbone_dir: Path) -> Settings:
    return tiny_settings(tmp_path / "home", tiny_backbone_dir)


@pytest.fixture
def backbone(settings: Settings) -> Backbone:
    return load_backbone(settings)


@pytest.fixture
def domain_data(tmp_path: Path) -> dict[str, Path]:
    """Tiny prompt/response files for two domains."""
    files = {}
    for domain, prompts in DOMAIN_PROMPTS.items():
        path = tmp_path / f"{domain}.jsonl"
        with path.open("w") as handle:
            for prompt in prompts:
                record = {"prompt": prompt, "response": f"A careful {domain} answer to: {prompt}"}
                handle.write(json.dumps(record) + "\n")
        files[domain] = path
    return files


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One backbone conversion and one routing-feature cache for all integration tests of a session: the
    features of the seed prompts are encoded once, not once per data home."""
    return tmp_path_factory.mktemp("moe-cache")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


# The session-wide live service (Ray Serve + the real backbone) for integration tests; one per session.
from tests.live_service import live  # noqa: E402, F401
