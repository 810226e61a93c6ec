"""MkDocs hook (mkdocs.yml: hooks): the command reference page shows the
``din-fast`` parser's own help for every command, so it cannot drift from the
code. A page containing the marker below gets it in the marker's place."""

import os

MARKER = "<!-- din-fast commands -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from din_fast.ctr.cli import build_parser

    os.environ["COLUMNS"] = "100"    # argparse wraps to the terminal's width
    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.choices and action.dest == "command"]
    sections = [f"## din-fast\n\n```text\n{parser.format_help()}```\n"]
    for name, command in commands.choices.items():
        sections.append(f"## din-fast {name}\n\n```text\n{command.format_help()}```\n")
    return markdown.replace(MARKER, "\n".join(sections))
