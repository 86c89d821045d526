"""`joulegate import-litellm`: turn a LiteLLM proxy config into a joulegate policy."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from policies import PolicyError, parse_policy

from ..litellm_import import convert


def cmd_import_litellm(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        config = yaml.safe_load(text)
        result = convert(config, os.environ)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"{args.file} is not valid YAML: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"import-litellm: {note}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(result.text, encoding="utf-8")
    else:
        sys.stdout.write(result.text)
    try:
        parse_policy(yaml.safe_load(result.text), args.output or "<stdout>")
    except (PolicyError, yaml.YAMLError) as exc:
        print(f"import-litellm: the policy needs editing before it can be served: {exc}",
              file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = sub.add_parser(
        "import-litellm", help="convert a LiteLLM proxy config.yaml into a policy",
        description="Convert a LiteLLM proxy config (model_list, fallbacks, router settings) "
                    "into a joulegate policy, printed on standard output. Each model_name "
                    "becomes a tier with its own backend: OpenAI-compatible deployments an "
                    "openai backend, vLLM ones a vllm backend (several of one model_name its "
                    "replicas). What does not carry over (other providers' APIs, dollar "
                    "budgets, callbacks, rate limits, the database) is listed in the policy "
                    "as '# not converted:' comments and, one line each, on standard error. "
                    "The master key is never copied: admin keys come from "
                    "$JOULEGATE_ADMIN_KEY. Exit status 1 if the result needs editing before "
                    "it can be served (e.g. nothing converted).",
        epilog="Example: joulegate import-litellm config.yaml > policy.yaml && "
               "joulegate check-policy policy.yaml")
    imp.add_argument("file", help="the LiteLLM config.yaml, or - to read standard input")
    imp.add_argument("-o", "--output", metavar="FILE",
                     help="write the policy to FILE instead of standard output")
    imp.set_defaults(func=cmd_import_litellm)
