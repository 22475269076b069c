"""
Exit statuses of a worker process that the server explains to clients.
"""

EXIT_SETUP = 78          # the module or the shared-memory file could not be loaded
EXIT_OUT_OF_MEMORY = 79  # a call hit the memory limit
EXIT_PARENT_GONE = 80    # the server went away
