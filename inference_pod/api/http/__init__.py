"""The HTTP front door: REST routes, the /ws protocol, /openapi.json and the live page (aiohttp)."""
