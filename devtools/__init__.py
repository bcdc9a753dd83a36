"""Development-only tools: never imported by the Services, never shipped in the Bento."""
