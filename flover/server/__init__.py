"""OpenAI-compatible HTTP server (`flover serve`): AsyncEngine + an ASGI app.

Import `flover.server.app` for the app; it needs the `serve` extra (fastapi, uvicorn).
`import flover` never imports this package.
"""
