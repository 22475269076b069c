# The twistd plugin: `twistd -n pipecomet`.  Nothing heavy is imported here;
# ServiceMaker imports pipecomet._service only when the plugin is used.
from twisted.application.service import ServiceMaker

pipecomet = ServiceMaker(
    "pipecomet",
    "pipecomet._service",
    "Serve a pipecomet app (the demo gateway by default).",
    "pipecomet",
)
