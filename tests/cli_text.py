"""What a CLI run said, as one line: typer prints usage errors in a rich box that wraps its text."""


def said(result) -> str:
    return " ".join(result.output.replace("│", " ").split())
