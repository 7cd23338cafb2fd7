"""Case actions: what a person does with a hot-alert case, as an event on a topic.

`csi case ACTION ID` produces one; a UI can produce the same JSON later. The
worker applies them in order per dealer (key = dealer_id, topic
`csi.case_actions`); an action the case cannot take becomes a dead letter
whose reason says why.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self
from uuid import UUID

from pydantic import StringConstraints, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.events import Comment, DealerId, InvalidEvent, Timestamp, _reason, _StrictModel

CaseId = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}/[0-9a-f]{10}$")
]
"""`<dealer_id>/<10 hex digits>`: the dealer is part of the id, so an action
can be routed to the dealer's partition from the id alone."""

CaseActionName = Literal["contact", "resolve", "close", "reopen"]
CloseReason = Literal["resolved", "customer_unreachable", "no_action_needed", "duplicate", "other"]


def case_dealer(case_id: str) -> str:
    """The dealer a case id belongs to."""
    return case_id.rsplit("/", 1)[0]


class CaseAction(_StrictModel):
    """One step of a case's lifecycle: open → contacted → resolved → closed."""

    action_id: UUID
    case_id: CaseId
    dealer_id: DealerId
    action: CaseActionName
    occurred_at: Timestamp
    by: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """Who acted (a user name or system id)."""
    reason: CloseReason | None = None
    comment: Comment | None = None
    schema_version: Literal[1] = 1

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        errors: list[InitErrorDetails] = []
        if case_dealer(self.case_id) != self.dealer_id:
            errors.append(_error("case_dealer", "case {case_id} belongs to another dealer",
                                 ("dealer_id",), self.dealer_id, case_id=self.case_id))  # fmt: skip
        if self.action == "close":
            if self.reason is None:
                errors.append(_error("close_reason", "closing a case needs a reason",
                                     ("reason",), None))  # fmt: skip
            if not (self.comment or "").strip():
                errors.append(_error("close_comment", "closing a case needs a comment",
                                     ("comment",), self.comment))  # fmt: skip
        elif self.reason is not None:
            errors.append(_error("reason_not_close", "only a close action takes a reason",
                                 ("reason",), self.reason))  # fmt: skip
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


def _error(
    kind: str, template: str, loc: tuple[str, ...], value: object, **context: object
) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, template, context), loc=loc, input=value)


def parse_case_action(raw: bytes | str) -> CaseAction:
    """Validate one case action; InvalidEvent (only) for bad input."""
    try:
        return CaseAction.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidEvent(_reason(exc)) from None
    except Exception as exc:  # keep the stream alive whatever arrives
        raise InvalidEvent(f"internal error while validating: {type(exc).__name__}: {exc}") from exc


def case_action_json(action: CaseAction) -> bytes:
    return action.model_dump_json().encode("utf-8")
