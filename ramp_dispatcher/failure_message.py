"""What a participant reads when a run failed for good: the submission's final
state and its ``error_msg`` (the frontend's lists show its first line).

Platform failures say so and blame nobody's code; a participant's failure
leads with the exception line of its traceback, taken from the fold's
``error.txt`` when ramp-test wrote one, else from the end of the log.
"""

from __future__ import annotations

from . import messages
from .results import read_fold_error
from .workers.base import FailureClass, RunOutcome, RunRequest


def final_failure(
    outcome: RunOutcome, request: RunRequest, attempt: int, max_attempts: int
) -> tuple[str, str]:
    """(state, error_msg) of a submission whose run failed with ``outcome`` at
    ``attempt`` (of ``max_attempts``, counted in the current retry budget)."""
    detail = _detail(outcome, request)
    return _state(outcome), messages.error_message(_reason(outcome, detail, attempt, max_attempts), detail)


def _state(outcome: RunOutcome) -> str:
    platform = (FailureClass.INFRASTRUCTURE, FailureClass.CONFIGURATION)
    return "checking_error" if outcome.failure in platform else "training_error"


def _reason(outcome: RunOutcome, detail: str | None, attempt: int, max_attempts: int) -> str:
    """The sentence that leads the error_msg."""
    failure = outcome.failure
    if failure is FailureClass.INFRASTRUCTURE:
        return (
            "The platform could not run this submission; this is a problem on the "
            f"platform's side, not in your code ({outcome.message}; "
            f"attempt {attempt} of {max_attempts})."
        )
    if failure is FailureClass.CONFIGURATION:
        return (
            "The platform could not run this submission because of its configuration, "
            f"not because of your code ({outcome.message})."
        )
    if failure in (FailureClass.TIMEOUT, FailureClass.MEMORY):
        return outcome.message
    # The exception line says more than an exit code: lead with it.
    last = next((ln.strip() for ln in reversed((detail or "").splitlines()) if ln.strip()), "")
    cause = f"{last} ({outcome.message})" if last else outcome.message
    return f"Your submission failed: {cause}"


def _detail(outcome: RunOutcome, request: RunRequest) -> str | None:
    """The traceback: the fold's error.txt if ramp-test wrote one, else the log's."""
    if outcome.failure in (FailureClass.INFRASTRUCTURE, FailureClass.CONFIGURATION):
        return None
    try:
        fold_error = read_fold_error(request.output_dir)
    except OSError:
        fold_error = None
    if fold_error:
        return fold_error
    log_path = outcome.log_path or request.log_path
    try:
        return messages.extract_traceback(messages.read_log_tail(log_path))
    except OSError:
        return None
