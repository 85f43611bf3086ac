// Drives @figuro/chatwoot-sdk (pinned in package-lock.json) through chatwoot-cache, set up as
// the SDK's README shows (`config.token`), for tests/clients.rs.
//
//   node probe.js <base_url> <token> <account_id> <conversation_id>
//
// Prints one JSON line: {"ok":true,"id":...,"viewer":...} for a conversation, or
// {"ok":false,"name":...,"message":...,"status":...,"body":...} for the error the SDK threw,
// which is what an application using the SDK gets to see.
"use strict";

// The README's `import ChatwootClient from "@figuro/chatwoot-sdk"`, in CommonJS.
const ChatwootClient = require("@figuro/chatwoot-sdk").default;

async function main() {
  const [baseUrl, token, accountId, conversationId] = process.argv.slice(2);
  const client = new ChatwootClient({
    config: { basePath: baseUrl, with_credentials: false, token },
  });
  try {
    const conversation = await client.conversations.get({
      accountId: Number(accountId),
      conversationId: Number(conversationId),
    });
    const viewer = conversation.custom_attributes && conversation.custom_attributes.viewer;
    console.log(JSON.stringify({ ok: true, id: conversation.id, viewer }));
  } catch (err) {
    console.log(
      JSON.stringify({
        ok: false,
        name: err.name,
        message: err.message,
        status: err.status,
        body: err.body,
      }),
    );
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
