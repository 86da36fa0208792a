"""twistd plugin: `twistd eke ...` runs the eketwist server (see eketwist.tap)."""

from twisted.application.service import ServiceMaker

eketwist = ServiceMaker(
    "eketwist",
    "eketwist.tap",
    "Password-authenticated (SPAKE2+) encrypted file server",
    "eke",
)
