"""How a pydantic model shows as a form in the Prefect UI: optional fields as plain boxes.

The Prefect UI (3.8) shows a `str | None` or `float | None` field as a two-button type switch, its
"None" side captioned 'Property is type "None"' (#23 saw ~25 of them on the run form). Optional text
becomes a text box and an optional number a number box, both empty, with no default in the schema:
an empty box is not sent (the field's default applies), and Prefect's validation accepts a null for a
property without a default (a spec pasted from a run.json holds nulls; with a default it refused
them). Bounds stay. A model that uses `plain_optionals` as its `json_schema_extra` reads an empty
text back as None with `empty_text_is_none` in a `mode="before"` validator.
"""

from __future__ import annotations

from typing import Any

_OPTIONAL_TEXT = [{"type": "string"}, {"type": "null"}]


def plain_optionals(schema: dict, cls: type | None = None) -> None:
    """Rewrite the optional text and number properties of ``schema`` in place (module docstring), and
    title every property: pydantic leaves an optional object (`Endpoint | None`) untitled, and the V2
    UI then labels it "Field"."""
    for name, prop in schema.get("properties", {}).items():
        prop.setdefault("title", name.replace("_", " ").title())
        branches = prop.get("anyOf") or []
        if branches == _OPTIONAL_TEXT and prop.get("default", "") is None:
            del prop["anyOf"]
            prop["type"] = "string"
        elif len(branches) == 2 and branches[1] == {"type": "null"} and branches[0].get("type") in ("number", "integer"):
            del prop["anyOf"]
            prop.update(branches[0])
        else:
            continue
        # No default in the schema: Prefect's validation then accepts a null for it (a spec pasted from a
        # run.json holds them), and the empty box is not sent. A real default is named in the description.
        default = prop.pop("default", None)
        if default is not None:
            prop["description"] = f"{prop.get('description', '')} Empty: {default}.".strip()


def empty_text_is_none(cls: type, data: Any) -> Any:
    """``data`` with "" as None for each optional text field of ``cls`` whose default is None."""
    if not isinstance(data, dict):
        return data
    optional = {k for k, f in cls.model_fields.items() if f.default is None and f.annotation == str | None}
    return {k: (None if k in optional and v == "" else v) for k, v in data.items()}
