"""How a pydantic model shows as a form in the Prefect UI: optional fields as plain boxes.

The Prefect UI (3.8) shows a `str | None` or `float | None` field as a two-button type switch, its
"None" side captioned 'Property is type "None"' (#23 saw ~25 of them on the run form). Optional text
becomes a text box, empty by default, and optional numbers a number box, empty when its default is
None (an empty box is not sent: the field's default applies); bounds stay. A model that uses
`plain_optionals` as its `json_schema_extra` reads the form's empty text back as None with
`empty_text_is_none` in a `mode="before"` validator.
"""

from __future__ import annotations

from typing import Any

_OPTIONAL_TEXT = [{"type": "string"}, {"type": "null"}]


def plain_optionals(schema: dict, cls: type | None = None) -> None:
    """Rewrite the optional text and number properties of ``schema`` in place (module docstring)."""
    for prop in schema.get("properties", {}).values():
        branches = prop.get("anyOf") or []
        if branches == _OPTIONAL_TEXT and prop.get("default", "") is None:
            del prop["anyOf"]
            prop.update(type="string", default="")
        elif len(branches) == 2 and branches[1] == {"type": "null"} and branches[0].get("type") in ("number", "integer"):
            del prop["anyOf"]
            prop.update(branches[0])
            if prop.get("default", 0) is None:
                del prop["default"]


def empty_text_is_none(cls: type, data: Any) -> Any:
    """``data`` with "" as None for each optional text field of ``cls`` whose default is None."""
    if not isinstance(data, dict):
        return data
    optional = {k for k, f in cls.model_fields.items() if f.default is None and f.annotation == str | None}
    return {k: (None if k in optional and v == "" else v) for k, v in data.items()}
