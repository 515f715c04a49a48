"""Griffe extension for module-level `jax.jit` objects and `name.__doc__ = "..."`.

ep_jax.train defines `train_step_jit = jax.jit(train_step, static_argnums=...)` and then
`train_step_jit.__doc__ = "..."`. Static analysis sees an attribute without a docstring;
this extension documents it as a function with the jitted function's signature and the
assigned docstring (what `help(ep_jax.train_step_jit)` shows at run time).
"""

from __future__ import annotations

import ast

import griffe


def _jitted(value: ast.expr) -> str | None:
    """`f` of `jax.jit(f, ...)` (or `jit(f, ...)`), else None."""
    if not (isinstance(value, ast.Call) and value.args and isinstance(value.args[0], ast.Name)):
        return None
    fn = value.func
    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
    return value.args[0].id if name == "jit" else None


class DocAssignments(griffe.Extension):
    def on_module_members(self, *, node, mod, agent, **kwargs) -> None:
        if not isinstance(node, ast.Module):
            return
        for stmt in node.body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
                continue
            t = stmt.targets[0]
            if isinstance(t, ast.Name) and (src := _jitted(stmt.value)):
                wrapped = mod.members.get(src)
                if isinstance(wrapped, griffe.Function) and not wrapped.is_alias:
                    fn = griffe.Function(
                        t.id,
                        parameters=wrapped.parameters,
                        returns=wrapped.returns,
                        lineno=stmt.lineno,
                        endlineno=stmt.end_lineno,
                    )
                    mod.set_member(t.id, fn)
            elif (
                isinstance(t, ast.Attribute)
                and t.attr == "__doc__"
                and isinstance(t.value, ast.Name)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                member = mod.members.get(t.value.id)
                if member is not None and not member.is_alias and member.docstring is None:
                    member.docstring = griffe.Docstring(stmt.value.value, lineno=stmt.lineno, parent=member)
