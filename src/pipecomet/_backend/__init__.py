"""
Backend services: a lean HTTP/1.1 client to named services, with discovery,
balancing, ejection, deadlines and a retry budget (DESIGN.md, "backend").
"""
