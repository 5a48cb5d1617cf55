"""Reading XLA's optimized HLO text: which kernel runs each dot, and program identity.

Used by the kernel study (bench/kernels.py) on `jax.jit(f).lower(...).compile().as_text()`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_BACKENDS = {"__ynn_fusion": "YNNPACK", "__xnn_fusion": "XNNPACK", "__onednn_fusion": "oneDNN"}


def _closing(text: str) -> int:
    """Index of the parenthesis closing the one `text` starts with."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    return len(text) - 1


def _computations(text: str) -> dict[str, list[dict[str, Any]]]:
    """Optimized HLO text -> {computation: [instruction {name, type, op, operands, calls,
    kind}]}; the entry computation is named "ENTRY"."""
    comps: dict[str, list[dict[str, Any]]] = {}
    cur = None
    for line in text.splitlines():
        head = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s+\(.*\{\s*$", line)
        if head and not line.startswith(" "):
            cur = "ENTRY" if head.group(1) else head.group(2)
            comps[cur] = []
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$", line)
        if cur is None or not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):  # a tuple type
            end = _closing(rest)
            typ, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            typ, _, rest = rest.partition(" ")
        op = re.match(r"([\w\-]+)\((.*)", rest)
        if not op:
            continue
        args = op.group(2).split("),")[0]
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        kind = re.search(r'"kind":"(\w+)"', rest) or re.search(r"kind=(\w+)", rest)
        comps[cur].append({"name": name, "type": typ, "op": op.group(1),
                           "operands": re.findall(r"%([\w.\-]+)", args),
                           "calls": calls.group(1) if calls else None,
                           "kind": kind.group(1) if kind else None, "root": "ROOT" in line[:8]})
    return comps


def fingerprint(text: str) -> str:
    """The optimized program with names and metadata stripped: equal for equal programs."""
    body = [re.sub(r"%[\w.\-]+|metadata=\{[^}]*\}|, stack_frame_id=\d+", "%", ln).strip()
            for ln in text.splitlines() if ln.startswith((" ", "ENTRY", "%", "}"))]
    return hashlib.sha1("\n".join(body).encode()).hexdigest()[:12]


def kernel_label(text: str) -> str:
    """Which kernel runs each dot of a compiled program, read off its optimized HLO text.

    "YNNPACK bf16*bf16>f32": a dot inside a YNNPACK fusion whose operands are bf16 converted
    to f32 inside the same fusion (`*`: YNNPACK takes the bf16 operands itself); "Eigen": a
    dot left at the top level (XLA's dot thunk); "+2 cvt": separate convert passes at the top
    level (an operand or result converted in its own pass); "+1 copy": separate transposes or
    copies (a layout change in its own pass).
    """
    comps = _computations(text)
    caller = {}
    for cname, instrs in comps.items():
        for ins in instrs:
            if ins["calls"]:
                caller[ins["calls"]] = (cname, ins)
    labels: dict[str, int] = {}
    for cname, instrs in comps.items():
        types = {i["name"]: i for i in instrs}
        for ins in instrs:
            if ins["op"] != "dot":
                continue
            if cname == "ENTRY":
                backend = "Eigen"
            else:
                _, fusion = caller.get(cname, (None, {}))
                backend = _BACKENDS.get(fusion.get("kind"), f"XLA {fusion.get('kind') or '?'}")
            parts = []
            for o in ins["operands"][:2]:
                src = types.get(o, {})
                if src.get("op") == "convert" and src["operands"]:
                    inner = types.get(src["operands"][0], {})
                    parts.append(inner.get("type", "?").split("[")[0] + "*")
                else:
                    parts.append(src.get("type", "?").split("[")[0])
            label = f"{backend} {parts[0]}·{parts[1] if len(parts) > 1 else '?'}" \
                    f">{ins['type'].split('[')[0]}"
            labels[label] = labels.get(label, 0) + 1
    roots = {c: next((i["op"] for i in instrs if i["root"]), None) for c, instrs in comps.items()}
    has_dot = {c for c, instrs in comps.items() if any(i["op"] == "dot" for i in instrs)}
    cvt = copy = 0
    for ins in comps.get("ENTRY", []):
        if ins["op"] == "fusion" and ins["calls"] in has_dot:
            continue
        op = roots.get(ins["calls"]) if ins["op"] == "fusion" else ins["op"]
        cvt += op == "convert"
        copy += op in ("copy", "transpose")
    out = ", ".join(f"{n}x {lab}" if n > 1 else lab for lab, n in labels.items()) or "no dot"
    return out + (f" +{cvt} cvt" if cvt else "") + (f" +{copy} copy" if copy else "")
