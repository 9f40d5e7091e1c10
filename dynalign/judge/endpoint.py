"""The judge on an OpenAI-compatible chat endpoint (``judge.kind=openai``), called from the driver."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dynalign.config import TrainConfig, api_key_from_env
from dynalign.judge.base import ModelJudge
from dynalign.judge.jobs import Job, JudgeRequestError, per_group, run_jobs
from dynalign.judge.parse import message_text


class OpenAIJudge(ModelJudge):
    """Chat completions on ``judge.base_url`` through the ``openai`` client: up to
    ``judge.max_concurrency`` requests in flight, each with ``judge.timeout_s``. The client does not
    retry (``max_retries=0``): ``run_jobs`` re-asks failed requests (connection errors, timeouts,
    408/409/429/5xx) with back-off, and unparseable outputs too, and counts both in the metrics.
    ``http_client``: an ``httpx.Client`` for the transport (tests pass a mock one)."""

    def __init__(self, config: TrainConfig, http_client=None):
        import openai

        key = api_key_from_env("judge.api_key_env", config.judge.api_key_env)
        super().__init__(config)
        self.client = openai.OpenAI(base_url=self.judge.base_url, api_key=key or "EMPTY", max_retries=0,
                                    timeout=self.judge.timeout_s, http_client=http_client)
        self.executor = ThreadPoolExecutor(max_workers=self.judge.max_concurrency, thread_name_prefix="dynalign-judge")

    def judge_items(self, items, seed: int) -> list[dict]:
        jobs = self.mode.plan(items, seed)
        values, counts = run_jobs(jobs, self.complete, self.judge, seed, len(items))
        return per_group(values, counts)

    def complete(self, jobs: list[Job], seed: int) -> list:
        futures = [self.executor.submit(self._one, job, seed + i) for i, job in enumerate(jobs)]
        return [f.result() for f in futures]

    def _one(self, job: Job, seed: int):
        """The judge's answer (``content`` only), or a JudgeRequestError."""
        import openai

        where = self.judge.base_url
        try:
            response = self.client.chat.completions.create(
                model=self.judge.api_model, messages=job.messages, max_tokens=job.max_tokens,
                temperature=self.judge.temperature, seed=seed, n=1)
        except openai.APIStatusError as err:
            status = err.status_code
            return JudgeRequestError(f"{where}: HTTP {status}: {err.response.text[:200]}",
                                     retryable=status in (408, 409, 429) or status >= 500)
        except openai.APIConnectionError as err:  # connection refused, timeout, ...
            cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
            return JudgeRequestError(f"{where}: {type(err).__name__}: {err}{cause}")
        except Exception as err:  # a body that is not a chat completion
            return JudgeRequestError(f"{where}: malformed response ({type(err).__name__}: {err})")
        try:
            return message_text(response.choices[0].message)
        except Exception as err:
            return JudgeRequestError(f"{where}: malformed response ({type(err).__name__}: {err})")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)
        self.client.close()
