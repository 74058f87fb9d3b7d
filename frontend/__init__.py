"""The web frontend: static ES modules, CSS and index.html, served by lnscope.server.frontend."""
