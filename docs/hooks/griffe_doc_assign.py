"""Griffe extension: `name.__doc__ = "..."` at module level is `name`'s docstring.

ep_jax.train sets the docstrings of its `jax.jit` objects that way (`train_step_jit.__doc__
= ...`); static analysis would otherwise show them without one.
"""

from __future__ import annotations

import ast

import griffe


class DocAssignments(griffe.Extension):
    def on_module_members(self, *, node, mod, agent, **kwargs) -> None:
        if not isinstance(node, ast.Module):
            return
        for stmt in node.body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
                continue
            t = stmt.targets[0]
            if (
                isinstance(t, ast.Attribute)
                and t.attr == "__doc__"
                and isinstance(t.value, ast.Name)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                member = mod.members.get(t.value.id)
                if member is not None and not member.is_alias and member.docstring is None:
                    member.docstring = griffe.Docstring(stmt.value.value, lineno=stmt.lineno, parent=member)
