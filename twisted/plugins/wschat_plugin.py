"""The ``twistd wschat`` plugin: the tap module is named as a string so twistd imports it lazily."""

from twisted.application.service import ServiceMaker

wschat = ServiceMaker(
    "wschat",
    "wschat.tap",
    "A WebSocket broadcast chat room.",
    "wschat",
)
