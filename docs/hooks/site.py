"""mkdocs hooks: the repository's own Markdown becomes pages of the site, unchanged on GitHub.

- README.md is the home page and CHANGELOG.md the changelog (one source each);
- the results tables and figures that live beside the code (experiments/results/,
  benchmarks/) are added under `repository/` with their repository paths;
- relative links are written for the repository's layout (README -> docs/api.md, docs pages
  -> ../experiments/results/...); each is re-pointed at the page or file the site has for
  that repository path. A link to a repository file that is not on the site (a script, a
  run folder's JSON) becomes the path in code font; a link to a path that does not exist
  in the repository is left alone, so `mkdocs build --strict` reports it;
- every name in `ep_jax.__all__` must be documented by a `::: ep_jax...` block of the
  API reference and have a docstring, else a warning (an error under --strict).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.plugins.ep_jax")
sys.path.insert(0, str(Path(__file__).parent))  # griffe_doc_assign

# repository files (globs) that are pages or images of the site, under PREFIX
EXTRA = [
    "experiments/results/**/*.md",
    "experiments/results/**/*.png",
    "benchmarks/README.md",
    "benchmarks/results/*.md",
]
PREFIX = "repository/"
# repository path -> site path, for the two top-level pages
RENAMED = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}

LINK = re.compile(r"(!?\[(?:[^\[\]]|\[[^\]]*\])*\])\(([^()\s]+)((?:\s+\"[^\"]*\")?)\)")
FENCE = re.compile(r"(^```.*?^```[ \t]*$)", re.S | re.M)


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _site_path(repo_path: str, root: Path) -> str | None:
    """The site's src_uri for a repository path (file or folder), or None if not on the site."""
    if repo_path in RENAMED:
        return RENAMED[repo_path]
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    full = root / repo_path
    if full.is_dir():  # a folder link (GitHub lists it): its README, or its one Markdown page
        pages = sorted(full.glob("README.md")) or sorted(full.glob("*.md"))
        if len(pages) != 1:
            return None
        repo_path = posixpath.join(repo_path, pages[0].name)
    if repo_path in _extra(root):
        return PREFIX + repo_path
    return None


def _extra(root: Path) -> list[str]:
    """Repository paths of the EXTRA files, sorted."""
    return sorted({p.relative_to(root).as_posix() for g in EXTRA for p in root.glob(g)})


def on_files(files, config):
    root = _root(config)
    for repo_path, site_path in RENAMED.items():
        files.append(File.generated(config, site_path, abs_src_path=str(root / repo_path)))
    for rel in _extra(root):
        files.append(File.generated(config, PREFIX + rel, abs_src_path=str(root / rel)))
    return files


def _repo_path_of_page(src_uri: str) -> str:
    back = {v: k for k, v in RENAMED.items()}
    if src_uri in back:
        return back[src_uri]
    if src_uri.startswith(PREFIX):
        return src_uri[len(PREFIX) :]
    return "docs/" + src_uri


def on_page_markdown(markdown, page, config, files):
    root = _root(config)
    here_repo = _repo_path_of_page(page.file.src_uri)
    here_site = page.file.src_uri

    def relink(m):
        text, target, title = m.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(here_repo), path))
        if repo_path.startswith("..") or not (root / repo_path).exists():
            return m.group(0)  # broken: --strict reports it
        site = _site_path(repo_path, root)
        if site is None:  # in the repository, not on the site
            return f"{text[1:-1] if not text.startswith('!') else text[2:-1]} (`{repo_path}`)"
        new = posixpath.relpath(site, posixpath.dirname(here_site) or ".")
        return f"{text}({new}{'#' + anchor if anchor else ''}{title})"

    parts = FENCE.split(markdown)
    return "".join(p if i % 2 else LINK.sub(relink, p) for i, p in enumerate(parts))


def on_page_content(html, page, config, files):
    """A notebook's Markdown links (`api.md`, right on GitHub and in Jupyter) reach the
    site as HTML that mkdocs does not rewrite: point them at the pages' URLs here, and
    report one whose page does not exist."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    from mkdocs.utils import get_relative_url

    def fix(m):
        path, anchor = m.group(1), m.group(2) or ""
        target = files.get_file_from_path(
            posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), path))
        )
        if target is None:
            log.warning("Doc file '%s' contains a link '%s', but the target is not found", page.file.src_uri, path)
            return m.group(0)
        return f'href="{get_relative_url(target.url, page.url)}{anchor}"'

    return re.sub(r'href="([^":#?]+\.md)(#[^"]*)?"', fix, html)


def on_post_build(config):
    """Every public name of ep_jax is in the API reference and has a docstring."""
    import griffe

    root = _root(config)
    from griffe_doc_assign import DocAssignments

    pkg = griffe.load(
        "ep_jax", search_paths=[str(root)], allow_inspection=False, extensions=griffe.load_extensions(DocAssignments())
    )
    exported = [str(n) for n in (pkg.exports or [])]
    blocks = set()
    for md in (root / "docs" / "reference").glob("*.md"):
        blocks |= set(re.findall(r"^:::\s*(\S+)", md.read_text(), re.M))
        # names listed as members of a `::: ep_jax` block
        blocks |= {f"ep_jax.{n}" for n in re.findall(r"^\s+- (\w+)\s*$", md.read_text(), re.M)}
    for name in exported:
        if name == "__version__":
            continue
        if f"ep_jax.{name}" not in blocks:
            log.warning("ep_jax.%s is public (ep_jax.__all__) but no docs/reference page documents it", name)
            continue
        obj = pkg[name]
        target = obj.final_target if obj.is_alias else obj
        if not (target.docstring and target.docstring.value.strip()):
            log.warning("ep_jax.%s (public) has no docstring", name)
    if not os.environ.get("EP_JAX_DOCS_QUIET"):
        log.info("API reference: %d public names of ep_jax documented", len(exported))
