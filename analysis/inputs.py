"""Turn a request's prompts, task or text into tensors, enforcing the request limits."""

from __future__ import annotations

from typing import Callable

from lnscope.analysis.checks import tokenize_prompts
from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.kinds.base import Inputs, Kind, Limits, RequestError
from lnscope.analysis.requests import AnalysisRequest


def _max_tokens(limits: Limits, n_ctx: int) -> int:
    return min(limits.max_prompt_tokens, n_ctx)


def prompt_inputs(request: AnalysisRequest, tokenizer, n_ctx: int, limits: Limits) -> Inputs:
    prompts = request.prompts or []
    if len(prompts) > limits.max_prompts:
        raise RequestError(["body", "prompts"], f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    limit = _max_tokens(limits, n_ctx)
    for i, prompt in enumerate(prompts):
        n = len(tokenizer.encode(prompt, add_special_tokens=False)) + 1  # + BOS
        if n > limit:
            raise RequestError(["body", "prompts", i], f"prompt {i + 1} has {n} tokens; the limit is {limit} "
                               f"(model context {n_ctx}, server maximum {limits.max_prompt_tokens})")
    tokens, lengths = tokenize_prompts(tokenizer, prompts, n_ctx)
    return Inputs(tokens=tokens, end_pos=lengths - 1)


def task_inputs(request: AnalysisRequest, tokenizer, n_ctx: int, limits: Limits):
    from lnscope.analysis import tasks

    spec = request.task
    assert spec is not None
    if spec.n_prompts > limits.max_prompts:
        raise RequestError(["body", "task", "n_prompts"], f"at most {limits.max_prompts} prompts per request")
    try:
        if spec.name == "custom":
            batch = tasks.make_custom(tokenizer, [p.model_dump() for p in spec.pairs or []])
            if len(spec.pairs or []) > limits.max_prompts:
                raise RequestError(["body", "task", "pairs"], f"at most {limits.max_prompts} pairs per request")
        else:
            split = {} if spec.split is None else {"split": spec.split}  # builders with a split default to heldout
            batch = tasks.build_task(spec.name, tokenizer, n_prompts=spec.n_prompts, seed=spec.seed, **split)
    except RequestError:
        raise
    except (ValueError, LnscopeError) as exc:
        raise RequestError(["body", "task"], str(exc)) from None
    if batch.clean_tokens.shape[1] > _max_tokens(limits, n_ctx):
        raise RequestError(["body", "task"], f"task prompts have {batch.clean_tokens.shape[1]} tokens; "
                           f"the limit is {_max_tokens(limits, n_ctx)}")
    return Inputs(task=batch, tokens=batch.clean_tokens, end_pos=batch.end_pos)


def text_inputs(request: AnalysisRequest, default_text: Callable[[], list[str]], limits: Limits) -> Inputs:
    texts = request.text if request.text is not None else default_text()
    if request.text is not None and len(texts) > limits.max_prompts:
        raise RequestError(["body", "text"], f"at most {limits.max_prompts} texts per request")
    total = sum(len(t) for t in texts)
    if request.text is not None and total > limits.max_prompts * limits.max_prompt_tokens * 8:
        raise RequestError(["body", "text"], "text too long for one request")
    return Inputs(texts=texts)


def prepare_inputs(kind: Kind, request: AnalysisRequest, tokenizer, n_ctx: int, limits: Limits,
                   default_text: Callable[[], list[str]]) -> Inputs:
    """The request's prompts, task or text as the kind takes them (`default_text()` when it names no text)."""
    if kind.inputs == "prompts_or_task":
        if request.task is not None:
            return task_inputs(request, tokenizer, n_ctx, limits)
        if request.prompts is not None:
            return prompt_inputs(request, tokenizer, n_ctx, limits)
        raise RequestError(["body", "prompts"], f"{kind.name} needs prompts or a task")
    if kind.inputs == "prompt":
        if request.task is not None or request.text is not None:
            raise RequestError(["body", "prompts"], f"{kind.name} takes one prompt, not a task or text")
        if not request.prompts or len(request.prompts) != 1:
            raise RequestError(["body", "prompts"], f"{kind.name} needs exactly one prompt")
        inputs = prompt_inputs(request, tokenizer, n_ctx, limits)
        inputs.texts = list(request.prompts)
        return inputs
    if kind.inputs == "task":
        if request.task is None:
            raise RequestError(["body", "task"], f"{kind.name} needs a task (clean and corrupted prompts)")
        return task_inputs(request, tokenizer, n_ctx, limits)
    if kind.inputs == "text":
        if request.prompts is not None or request.task is not None:
            raise RequestError(["body", "text"],
                               f"{kind.name} takes text (or nothing: the pair's eval text), not prompts or a task")
        return text_inputs(request, default_text, limits)
    for field in ("prompts", "task", "text"):
        if getattr(request, field) is not None:
            raise RequestError(["body", field], f"{kind.name} takes no {field}; its inputs are its options")
    return Inputs()
