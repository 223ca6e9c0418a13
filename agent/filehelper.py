"""File operations run *as the user*: the agent starts this script with the user's identity.

It is passed to ``python3 -I -S -c`` as source text, so it uses the standard library only and
imports nothing of Marco. The kernel, not the agent, decides what the user may read or write.

Protocol (stdout): one JSON status line first, ``{"ok": true, ...}`` or
``{"ok": false, "status": 403, "error": "..."}``; for `read`, the file's bytes follow it.
`write` reads its data from stdin as frames (4-byte big-endian length + bytes); a zero-length
frame commits. EOF before the commit frame aborts and leaves nothing behind.

    write PATH MODE|- OVERWRITE(0|1) [MKDIR(0|1)]
    read PATH

With MKDIR 1, `write` first makes the file's directory as Ansible makes its remote tmp
(`umask 77 && mkdir -p BASE && mkdir DIR`): missing ancestors with mode 0700, and the directory
itself, which must not exist yet (409).
"""

import errno
import os
import signal
import stat
import struct
import sys

STATUS_BY_ERRNO = {
    errno.EACCES: 403, errno.EPERM: 403, errno.EROFS: 403, errno.ENOENT: 404,
    errno.ENOTDIR: 400, errno.EISDIR: 409, errno.EEXIST: 409, errno.ENOSPC: 507,
    errno.EDQUOT: 507, errno.ELOOP: 400, errno.ENAMETOOLONG: 400,
}
CHUNK = 1024 * 1024
SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
                 "\f": "\\f"}


def report(**fields):
    sys.stdout.buffer.write(encode(fields).encode() + b"\n")
    sys.stdout.buffer.flush()


def encode(fields):
    """The status line as `json.dumps` writes it (ASCII only): the helper starts for every
    file, and importing json (with re and enum) took about a third of its start."""
    return "{" + ", ".join(_value(name) + ": " + _value(value)
                           for name, value in fields.items()) + "}"


def _value(value):
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return str(int(value))
    parts = ['"']
    for char in str(value):
        code = ord(char)
        if char in SHORT_ESCAPES:
            parts.append(SHORT_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            parts.append(char)
        elif code > 0xFFFF:  # a surrogate pair, as json writes it
            code -= 0x10000
            parts.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
        else:
            parts.append(f"\\u{code:04x}")
    parts.append('"')
    return "".join(parts)


def fail(status, message):
    report(ok=False, status=status, error=message)
    sys.exit(1)


def fail_os(exc, what):
    fail(STATUS_BY_ERRNO.get(exc.errno, 500), f"{what}: {exc.strerror}")


def read_exact(fd, size):
    parts = []
    while size:
        data = os.read(fd, min(size, CHUNK))
        if not data:
            return None
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def copy_frame(fd, length):
    """Move `length` bytes from stdin (a pipe) into the file: splice(2) where it works (no copy
    through user space), else read and write."""
    while length:
        try:
            moved = os.splice(0, fd, length)
        except (AttributeError, OSError):
            data = os.read(0, min(length, CHUNK))
            moved = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        if moved == 0:
            raise EOFError
        length -= moved


def make_directory(directory):
    """`umask 77 && mkdir -p PARENT && mkdir DIRECTORY`, as Ansible makes a remote tmp."""
    old = os.umask(0o077)
    try:
        os.makedirs(os.path.dirname(directory.rstrip("/")) or "/", 0o700, exist_ok=True)
        os.mkdir(directory, 0o700)
    except OSError as exc:
        fail_os(exc, directory)
    finally:
        os.umask(old)


def _terminated(signum, frame):
    """SIGTERM (the user's runner quitting, or anyone) ends an upload as an early EOF does:
    its temporary file removed, nothing written."""
    raise EOFError


def write(path, mode_text, overwrite, mkdir=False):
    directory = os.path.dirname(path) or "/"
    name = os.path.basename(path)
    if mkdir:
        make_directory(directory)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        fail_os(exc, path)
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            fail(409, f"{path} is a directory")
        if not overwrite:
            fail(409, f"{path} exists and overwrite is false")
    if mode_text != "-":
        mode = int(mode_text, 8)
    elif existing is not None and stat.S_ISREG(existing.st_mode):
        mode = stat.S_IMODE(existing.st_mode)
    else:
        mode = 0o644
    tmp = os.path.join(directory, f".{name[:200]}.marco-{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        fail_os(exc, directory)
    try:
        signal.signal(signal.SIGTERM, _terminated)
        report(ok=True, ready=True)
        size = 0
        while True:
            header = read_exact(0, 4)
            if header is None:
                raise EOFError
            length = struct.unpack(">I", header)[0]
            if length == 0:
                break
            copy_frame(fd, length)
            size += length
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic "create unless it exists"
            os.unlink(tmp)
        tmp = None
    except EOFError:
        fail(400, "upload ended before it was complete; nothing was written")
    except OSError as exc:
        fail_os(exc, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    report(ok=True, path=path, size=size, mode=f"{mode:04o}")


def read(path):
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; cleared once it is a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        info = os.fstat(fd)
    except OSError as exc:
        fail_os(exc, path)
    if not stat.S_ISREG(info.st_mode):
        fail(400, f"{path} is not a regular file")
    os.set_blocking(fd, True)
    report(ok=True, size=info.st_size, mode=f"{stat.S_IMODE(info.st_mode):04o}",
           mtime=info.st_mtime)
    out = sys.stdout.fileno()
    offset = 0
    while offset < info.st_size:  # exactly the size announced, even if the file grows
        sent = os.sendfile(out, fd, offset, min(CHUNK, info.st_size - offset))
        if sent == 0:
            break  # it shrank: the agent sees fewer bytes than announced and says so
        offset += sent


def main(argv):
    if argv[:1] == ["write"] and len(argv) in (4, 5):
        write(argv[1], argv[2], argv[3] == "1", argv[4:] == ["1"])
    elif argv[:1] == ["read"] and len(argv) == 2:
        read(argv[1])
    else:
        fail(400, "usage: write PATH MODE OVERWRITE [MKDIR] | read PATH")


if __name__ == "__main__":
    main(sys.argv[1:])
