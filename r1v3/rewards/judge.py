"""Optional model-based answer verifier for the accuracy reward.

Skywork-R1V3 (arXiv 2507.06167, §3.2) sets R_acc = 1 when the rule check OR a model-based verifier
(they name Qwen2.5-32B-Instruct) judges the final answer correct; the judge rescues answers the
rules miss (units, wording, equivalent forms math-verify cannot parse). :class:`r1v3.rewards.R1V3Reward`
only asks the judge about items the rules scored 0, and treats a judge exception as "incorrect".

Protocol: any callable ``judge(question: str, reference: str, response: str) -> bool``.
Optionally it has ``judge_batch(items: list[tuple[str, str, str]]) -> list[bool]``, which the
reward uses instead of per-item calls.

A real judge from a local directory, in the GRPO stage's config (the reward is named by import
path and built by :func:`r1v3.rewards.load_reward`)::

    model:
      init_args:
        reward_fn: r1v3.rewards.R1V3Reward
        reward_kwargs:
          judge: r1v3.rewards.judge.HFJudge
          judge_kwargs: {model_path: /models/Qwen2.5-32B-Instruct, device: cuda, dtype: bfloat16}

A 32B judge next to the policy is expensive on one node; the usual setup serves it with vLLM
(``vllm serve /models/Qwen2.5-32B-Instruct``) and plugs in a small class of your own with the same
signature, e.g. ``my_pkg.judges.EndpointJudge`` whose ``__call__`` sends
:func:`judge_messages` to the OpenAI-compatible ``/v1/chat/completions`` endpoint with
``temperature=0, max_tokens=8`` and returns :func:`parse_verdict` of the reply (its
``judge_batch`` can send the requests concurrently). r1v3 ships no network client.

Reward hacking: the policy writes the response the judge reads. Fields are length-capped, the judge
sees only the part after ``</think>``, and the judge tokenizer's special tokens are stripped from
every field so a response cannot close the user turn and write the judge's "yes" itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from r1v3.chat import parse_response

PROMPT = (
    "You are checking a student's answer against a reference answer.\n\n"
    "Question:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Response:\n{response}\n\n"
    "Is the response's final answer equivalent to the reference? Answer yes or no."
)
_IMAGE_MARK = re.compile(r"<image(?: \d+)?>")


def final_part(response: str, max_chars: int = 2000) -> str:
    """What the judge needs to read: the answer after ``</think>`` (the whole response if it has
    no think block), keeping its last ``max_chars`` characters, where the final answer is."""
    parsed = parse_response(response)
    text = parsed.answer_text if parsed.think is not None else response
    return text[-max_chars:]


def judge_messages(question: str, reference: str, response: str, max_chars: int = 2000,
                   banned: Sequence[str] = ()) -> list[dict]:
    """The chat messages for one verdict. ``banned`` strings (the judge tokenizer's special
    tokens) are removed from every field."""

    def clean(text: str, keep_tail: bool = False) -> str:
        # Tokenizers need valid UTF-8; lone surrogates from a broken decode become "?".
        text = str(text).encode("utf-8", "replace").decode("utf-8")
        text = _IMAGE_MARK.sub("[image]", text)
        for token in banned:
            text = text.replace(token, "")
        return text[-max_chars:] if keep_tail else text[:max_chars]

    content = PROMPT.format(question=clean(question), reference=clean(reference),
                            response=clean(final_part(response, max_chars), keep_tail=True))
    return [{"role": "user", "content": content}]


def parse_verdict(text: str) -> bool:
    return text.strip().lower().startswith("yes")


class HFJudge:
    """A local Hugging Face causal LM (or a VLM, used text-only) as a yes/no answer judge.

    Greedy decoding of ``max_new_tokens`` tokens; the verdict is True iff the output starts with
    "yes" (case-insensitive).
    """

    def __init__(self, model_path: str, max_new_tokens: int = 8, device: str = "cpu",
                 dtype: str = "float32", trust_remote_code: bool = False, batch_size: int = 8,
                 max_chars: int = 2000):
        import torch

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"judge model directory {model_path!r} does not exist")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        self.max_new_tokens, self.batch_size, self.max_chars = max_new_tokens, batch_size, max_chars
        self.device = torch.device(device)
        self.model = self._load_model(path, torch_dtype, trust_remote_code).to(self.device).eval()
        self.tokenizer = self._load_tokenizer(path, trust_remote_code)
        # Left padding puts every prompt's last token at the end, where generation continues.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.banned = tuple(t for t in self.tokenizer.all_special_tokens if t)

    @staticmethod
    def _load_model(path: Path, torch_dtype, trust_remote_code: bool):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
        except ValueError:
            # A VLM directory (its config class is not a causal-LM one): use it text-only.
            return AutoModelForImageTextToText.from_pretrained(str(path), config=config, **kwargs)

    @staticmethod
    def _load_tokenizer(path: Path, trust_remote_code: bool):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            from r1v3.backbone import load_processor

            return load_processor(path, trust_remote_code=trust_remote_code).tokenizer

    def _prompt(self, question: str, reference: str, response: str) -> str:
        messages = judge_messages(question, reference, response, self.max_chars, self.banned)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages[0]["content"] + "\nAnswer: "

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        import torch

        verdicts: list[bool] = []
        for start in range(0, len(items), self.batch_size):
            prompts = [self._prompt(*item) for item in items[start:start + self.batch_size]]
            # The template already wrote BOS/turn markers; do not add another BOS.
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          temperature=None, top_p=None, top_k=None,
                                          pad_token_id=self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            verdicts.extend(parse_verdict(text) for text in texts)
        return verdicts

    def __call__(self, question: str, reference: str, response: str) -> bool:
        return self.judge_batch([(question, reference, response)])[0]
