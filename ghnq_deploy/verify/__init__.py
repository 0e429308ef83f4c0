"""verify: run exported files on a target (this host, a device over SSH, an emulated device) and
compare the real fixed-point outputs with the simulation the export promised.

Modules: ``target`` (target files -> validated dataclasses), ``connection`` (local / SSH /
emulator transports), ``device_runner`` (the self-contained script that runs on the device),
``emulator`` (the QEMU root filesystem), ``compare`` (sim vs real statistics), ``pipeline``
(the stages), ``report`` (JSON and PNG).
"""
