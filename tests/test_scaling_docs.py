"""The files docs/scaling.md gives users: each one parses, and the Kubernetes base job template's
placeholders are all defined variables (what Prefect requires of a work pool's template)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_kubernetes_template_uses_only_its_variables():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((DOCS / "scaling" / "k8s-gpu-base-job-template.json").read_text())
    variables = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= variables, used - variables
    assert {"gpus", "node_selector", "workspace_claim", "workspace_mount"} <= used
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    mounted = {m["name"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == mounted
    # the job_variables docs/scaling.md sets on the train-job deployment are variables of the template
    doc = (DOCS / "scaling.md").read_text()
    block = re.search(r"job_variables:\n((?: {8}.*\n)+)", doc).group(1)
    set_there = {line.split(":")[0].strip() for line in block.splitlines()}
    assert set_there and set_there <= variables, set_there - variables


def test_the_accelerate_configs_describe_the_processes_they_launch():
    gpu = yaml.safe_load((DOCS / "scaling" / "accelerate-multi-gpu.yaml").read_text())
    nodes = yaml.safe_load((DOCS / "scaling" / "accelerate-multi-node.yaml").read_text())
    assert gpu["distributed_type"] == nodes["distributed_type"] == "MULTI_GPU"
    assert gpu["num_machines"] == 1 and gpu["num_processes"] > 1
    assert nodes["num_machines"] > 1 and nodes["num_processes"] % nodes["num_machines"] == 0
    assert nodes["main_process_ip"] and nodes["main_process_port"]
