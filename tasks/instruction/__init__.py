"""One instruction sentence → a RunSpec a person approves: `parse` (offline, deterministic), `llm`
(a planner model, checked), `resolve` (explicit fields win; each field's source). See
docs/ARCHITECTURE.md."""
