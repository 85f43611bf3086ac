"""Drives the Python SDK `chatwoot-sdk` (PyPI, pinned in requirements.txt) through
chatwoot-cache, set up as its README shows, for tests/clients.rs.

    python probe.py <base_url> <token> <account_id> <conversation_id>

Prints one JSON line: {"ok": true, "id": ..., "viewer": ...} for a conversation, or
{"ok": false, "type": ..., "status": ..., "description": ..., "errors": ..., "text": ...}
for the exception the SDK raised, which is what an application using it gets to see.
"""

import json
import sys

from chatwoot import ChatwootAPIError, ChatwootClient


def main() -> None:
    base_url, token, account_id, conversation_id = sys.argv[1:5]
    client = ChatwootClient(base_url=base_url, api_token=token)
    try:
        conversation = client.conversations.get(
            account_id=int(account_id), conversation_id=int(conversation_id)
        )
        custom = getattr(conversation, "custom_attributes", None) or {}
        print(json.dumps({"ok": True, "id": conversation.id, "viewer": custom.get("viewer")}))
    except ChatwootAPIError as err:
        print(
            json.dumps(
                {
                    "ok": False,
                    "type": type(err).__name__,
                    "status": err.status_code,
                    "description": err.description,
                    "errors": err.errors,
                    "text": str(err),
                }
            )
        )
    finally:
        client.close()


if __name__ == "__main__":
    main()
