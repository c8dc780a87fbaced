"""Safe unpacking of an uploaded adapter archive (.tar, .tar.gz or .zip): every member is checked before
anything is written. Only the files of a peft LoRA folder are accepted, by base name, from the archive's top
level or one folder down; links, devices, absolute paths, `..`, oversized or too many members are refused.
Members are copied by reading them, never with extractall."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from core.errors import AdapterValidationError

ALLOWED = frozenset({"adapter_config.json", "adapter_model.safetensors", "moe_expert.json", "README.md"})
MAX_MEMBERS = 16


def _checked_name(name: str) -> str | None:
    """The base name to write, None for a directory entry; raises for anything unsafe."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or ":" in path.parts[0]:
        raise AdapterValidationError(f"Archive member {name!r} has an unsafe path.")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        return None
    if len(parts) > 2:
        raise AdapterValidationError(f"Archive member {name!r} is nested too deep; put the adapter files at the top.")
    if parts[-1] not in ALLOWED:
        raise AdapterValidationError(
            f"Archive member {name!r} is not part of a LoRA adapter (allowed: {', '.join(sorted(ALLOWED))})."
        )
    return parts[-1]


def unpack_adapter_archive(data: bytes, target: Path, max_bytes: int) -> Path:
    """Check and unpack `data` into `target` (created); returns the folder holding the adapter files."""
    plan: dict[str, bytes] = {}
    total = 0
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise AdapterValidationError(f"Archive has {len(members)} members; at most {MAX_MEMBERS}.")
            for info in members:
                name = _checked_name(info.filename)
                if name is None or info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise AdapterValidationError(f"Archive member {info.filename!r} is a symbolic link.")
                total += info.file_size
                if total > max_bytes:
                    raise AdapterValidationError(f"Archive unpacks to more than {max_bytes} bytes.")
                plan[name] = archive.read(info)
    else:
        try:
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 - closed just below
        except tarfile.TarError as exc:
            raise AdapterValidationError("Upload is not a .zip, .tar or .tar.gz archive.") from exc
        with archive:
            members = archive.getmembers()
            if len(members) > MAX_MEMBERS:
                raise AdapterValidationError(f"Archive has {len(members)} members; at most {MAX_MEMBERS}.")
            for member in members:
                name = _checked_name(member.name)
                if name is None or member.isdir():
                    continue
                if not member.isfile():
                    raise AdapterValidationError(f"Archive member {member.name!r} is a link or special file.")
                total += member.size
                if total > max_bytes:
                    raise AdapterValidationError(f"Archive unpacks to more than {max_bytes} bytes.")
                handle = archive.extractfile(member)
                plan[name] = handle.read() if handle is not None else b""
    if "adapter_model.safetensors" not in plan or "adapter_config.json" not in plan:
        raise AdapterValidationError("Archive lacks adapter_config.json or adapter_model.safetensors.")
    target.mkdir(parents=True, exist_ok=False)
    for name, content in plan.items():
        (target / name).write_bytes(content)
    return target
