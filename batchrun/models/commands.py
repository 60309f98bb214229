"""`batchrun models list | show | pull | check`: what batchrun knows of each model, and the API's catalogue.

Exit codes (SPEC, Version 0.2): list 0; show 0, or 2 for an unknown model; pull 0, or 1 when some model
failed; check 0 when the same, 1 when something differs.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from batchrun.errors import BatchrunError, UsageError
from batchrun.models import ModelFileError, UnknownModel, all_models, get_model, user_dir
from batchrun.models.catalogue import data_from_entry, differences, write_pulled
from batchrun.models.dataformat import read_model_data

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _origin(model) -> str:
    return "shipped" if model.origin == "shipped" else "user"


def summary(model) -> dict[str, Any]:
    """One model as a line of `models list --json`."""
    return {"model_id": model.model_id, "output_kind": model.output_kind, "price": model.price.describe(),
            "price_known": model.price.known, "source": _origin(model), "file": model.origin}


def details(model) -> dict[str, Any]:
    """Everything `models show` prints: fields, media fields, duration and audio fields, price, rules."""
    props = model.input_schema.get("properties", {})
    required = set(model.input_schema.get("required", []))
    fields = {}
    for name, spec in props.items():
        spec = spec if isinstance(spec, dict) else {}
        shown = {k: spec[k] for k in ("type", "enum", "minimum", "maximum", "minItems", "maxItems", "default")
                 if k in spec}
        fields[name] = {**shown, "required": name in required}
    price = model.price
    return {
        **summary(model),
        "title": model.title,
        "facts_from": model.source,
        "fields": fields,
        "media_fields": model.url_fields,
        "duration_field": price.duration_field,
        "duration_unit": price.duration_unit,
        "audio_field": price.audio_field,
        "audio_inverted": price.audio_inverted,
        "price_formula": {k: v for k, v in price.__dict__.items()},
        "max_outputs": model.max_outputs,
        "rules": model.rules,
        "prose_rules": list(model.prose_rules),
    }


def cmd_list(args, out: TextIO, err: TextIO) -> int:
    models = sorted(all_models().values(), key=lambda m: m.model_id)
    if args.json:
        print(json.dumps([summary(m) for m in models], indent=2), file=out)
        return EXIT_OK
    width = max(len(m.model_id) for m in models)
    for model in models:
        print(f"{model.model_id:<{width}}  {model.output_kind:<5}  {_origin(model):<7}  {model.price.describe()}",
              file=out)
    folder = user_dir()
    print(f"{len(models)} models; user folder: {folder if folder is not None else 'none ($BATCHRUN_MODELS)'}",
          file=out)
    return EXIT_OK


def cmd_show(args, out: TextIO, err: TextIO) -> int:
    try:
        model = get_model(args.model_id)
    except UnknownModel as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_USAGE
    info = details(model)
    if args.json:
        print(json.dumps(info, indent=2), file=out)
        return EXIT_OK
    print(f"{model.model_id} ({info['title']}): {model.output_kind}, up to {model.max_outputs} output(s) a job",
          file=out)
    print(f"  source: {'shipped with batchrun' if model.origin == 'shipped' else 'user file ' + model.origin}",
          file=out)
    if model.source:
        print(f"  facts from: {model.source}", file=out)
    print(f"  price: {model.price.describe()}", file=out)
    duration, audio = model.price.duration_field, model.price.audio_field
    unit = " (milliseconds)" if model.price.duration_unit == "ms" else " (seconds)"
    print(f"  duration field: {duration + unit if duration else 'none'}", file=out)
    sense = " (true means no audio)" if model.price.audio_inverted else ""
    print(f"  audio switch: {audio + sense if audio else 'none'}", file=out)
    print("  fields:", file=out)
    for name, spec in info["fields"].items():
        facts = ", ".join(f"{k} {json.dumps(v)}" for k, v in spec.items() if k != "required")
        print(f"    {name}{' (required)' if spec['required'] else ''}: {facts}", file=out)
    for kind, paths in model.url_fields.items():
        print(f"  {kind} inputs: {', '.join(paths)}", file=out)
    for kind, value in model.rules.items():
        print(f"  rule {kind}: {json.dumps(value)}", file=out)
    for text in model.prose_rules:
        print(f"  note: {text}", file=out)
    return EXIT_OK


def _raw_local(model) -> dict[str, Any] | None:
    """The local data file's JSON as written (for its hand-written keys), or None."""
    if model.origin == "shipped":
        for entry in resources.files("batchrun.models").iterdir():
            if entry.name.endswith(".json"):
                data = json.loads(entry.read_text("utf-8"))
                if data.get("model_id") == model.model_id:
                    return data
        return None
    return json.loads(Path(model.origin).read_text("utf-8"))


async def _fetch_all(base_url: str, token: str, model_ids: list[str]) -> dict[str, dict | BatchrunError]:
    """Each model's catalogue entry, or the error that stopped it (one model's failure stops no other)."""
    import aiohttp

    from batchrun.api import Client

    found: dict[str, dict | BatchrunError] = {}
    async with aiohttp.ClientSession() as session:
        client = Client(session, base_url, token, request_timeout=60.0)
        for model_id in model_ids:
            try:
                found[model_id] = await client.model(model_id)
            except BatchrunError as exc:
                found[model_id] = exc
    return found


def _connection(args) -> tuple[str, str]:
    from batchrun.settings import base_url as resolve_base_url

    token = os.environ.get("RUNCOMFY_API_TOKEN", "").strip()
    if not token:
        raise UsageError("set RUNCOMFY_API_TOKEN to your RunComfy API token")
    return resolve_base_url(args.base_url, os.environ), token


def cmd_pull(args, out: TextIO, err: TextIO) -> int:
    folder = user_dir(args.models_dir)
    if folder is None:
        raise UsageError("set BATCHRUN_MODELS (or --models-dir) to the folder pulled model files go to")
    base_url, token = _connection(args)
    known = all_models(folder, missing_ok=True)
    entries = _run_async(_fetch_all(base_url, token, args.model_ids))
    failed = 0
    for model_id, entry in entries.items():
        try:
            if isinstance(entry, BaseException):
                raise entry
            overlay = _raw_local(known[model_id]) if model_id in known else None
            path = write_pulled(folder, data_from_entry(entry, overlay, base_url))
        except (BatchrunError, OSError) as exc:
            failed += 1
            print(f"{model_id}: not pulled: {exc}", file=err)
            continue
        print(f"{model_id}: wrote {path}", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_check(args, out: TextIO, err: TextIO) -> int:
    models = all_models(args.models_dir)
    model_ids = args.model_ids or sorted(models)
    for model_id in model_ids:
        if model_id not in models:
            raise UsageError(f"unknown model {model_id!r}; `batchrun models list` shows the known models")
    base_url, token = _connection(args)
    entries = _run_async(_fetch_all(base_url, token, model_ids))
    differ = 0
    for model_id in model_ids:
        entry = entries[model_id]
        try:
            if isinstance(entry, BaseException):
                raise entry
            local_raw = _raw_local(models[model_id])
            local = read_model_data(local_raw, models[model_id].origin)
            pulled = read_model_data(data_from_entry(entry, local_raw, base_url), f"the API's {model_id}")
        except BatchrunError as exc:  # the API's error, an unusable entry, a broken local file
            differ += 1
            print(f"{model_id}: not checked: {exc}", file=out)
            continue
        found = differences(local, pulled)
        differ += bool(found)
        print(f"{model_id}: {'differs' if found else 'same'}", file=out)
        for line in found:
            print(f"  {line}", file=out)
    return EXIT_FAILED if differ else EXIT_OK


def _guarded(handler):
    """A broken user model file is a usage problem (exit 2) with its file and field, not a traceback."""
    def run(args, out: TextIO, err: TextIO) -> int:
        try:
            return handler(args, out, err)
        except ModelFileError as exc:
            print(f"batchrun: {exc}", file=err)
            return EXIT_USAGE
    return run


def add_commands(commands) -> None:
    """Add `models` and its subcommands to batchrun's argparse subparsers."""
    def command(parent, name: str, summary: str, exits: str):
        return parent.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                 epilog=exits)

    models = command(commands, "models", "the models batchrun knows: list, show, pull, check",
                     "exit: 2 without a subcommand; see each subcommand's --help.")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", parser_class=type(models))
    listing = command(sub, "list", "every known model: id, output kind, source, price (or unknown)",
                      "exit: 0 listed; 2 a user model file is broken.")
    listing.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    listing.set_defaults(handler=_guarded(cmd_list))
    show = command(sub, "show", "one model's fields, media, duration and audio fields, price, rules",
                   "exit: 0 shown; 2 unknown model.")
    show.add_argument("model_id", metavar="MODEL_ID", help="a model id, as 'batchrun models list' prints it")
    show.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    show.set_defaults(handler=_guarded(cmd_show))
    for name, handler, text, exits in (
            ("pull", cmd_pull, "fetch GET /v1/models/{id} and write a data file to the user folder",
             "exit: 0 every model written; 1 some failed; 2 usage error."),
            ("check", cmd_check, "where the API's schema or price differs from the local file",
             "exit: 0 the same; 1 some differ or could not be fetched; 2 usage error.")):
        command_ = command(sub, name, text, exits)
        command_.add_argument("model_ids", nargs="+" if name == "pull" else "*", metavar="MODEL_ID",
                              help="model ids" + (" (default: every known model)" if name == "check" else ""))
        command_.add_argument("--base-url", metavar="URL", help="API base URL (default: $RUNCOMFY_BASE_URL)")
        command_.add_argument("--models-dir", metavar="DIR", help="the user folder of model files "
                              "(default: $BATCHRUN_MODELS)")
        command_.set_defaults(handler=_guarded(handler))
    models.set_defaults(handler=lambda args, out, err: (models.print_help(out), EXIT_USAGE)[1])


def _run_async(coroutine):
    import asyncio  # here: `batchrun` builds its command line with this module, and most commands never need it

    return asyncio.run(coroutine)
