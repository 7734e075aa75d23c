"""moas.chat - how a conversation becomes a prompt (Model.chat, the server's
/v1/chat/completions). Standard library only."""

import json

from . import MoasError, MoasValueError, Status


class ChatMessageError(MoasValueError):
    """A conversation that is not one (MOAS_ERR_INVALID_ARG, also a ValueError): its
    message names the message at fault; `code` says how, in the server's words:
    "invalid_type", "invalid_value" or "unsupported"."""

    def __init__(self, message, code):
        super().__init__(Status.ERR_INVALID_ARG, message)
        self.code = code


MESSAGE_FIELDS = {"role", "content", "name"}


def short_name(name):
    """A field's name as an error message shows it: at most 64 characters (a request
    may be a megabyte of one name)."""
    return name if len(name) <= 64 else name[:64] + "..."


def _content(m, i):
    """Message i's content as one string: a string, or a list of text parts joined."""
    content = m.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ChatMessageError(
                    "messages[%d].content[%d] must be a text part {\"type\": \"text\", "
                    "\"text\": ...}%s" % (i, j, ", not %s" % json.dumps(kind)[:40]
                                          if isinstance(kind, str) and kind != "text"
                                          else ""), "invalid_value")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ChatMessageError("messages[%d].content must be a string or a list of text "
                               "parts" % i, "invalid_type")
    return content


def conversation(messages):
    """OpenAI's chat messages checked and made plain: a list of {"role", "content"}
    with each content one string, or ChatMessageError. A message is an object of a
    role (system, developer, user or assistant), a content (a string, or a list of text
    parts {"type": "text", "text": ...}, joined) and optionally a name (a string, not
    written); tools, images and other fields are not taken, but any field at null is
    as if absent."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatMessageError("'messages' must be a non-empty list of messages",
                               "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatMessageError("messages[%d] must be an object" % i, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ChatTemplate.ROLES:
            raise ChatMessageError("messages[%d].role must be one of %s%s" % (
                i, ", ".join(sorted(ChatTemplate.ROLES)),
                ", not %s (there are no tools)" % json.dumps(role)
                if role in ("tool", "function") else ""), "invalid_value")
        for name in m:   # null is absence (a client's own copy of an answer has them)
            if name not in MESSAGE_FIELDS and m[name] is not None:
                raise ChatMessageError("messages[%d].%s is not supported"
                                       % (i, short_name(name)), "unsupported")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise ChatMessageError("messages[%d].name must be a string" % i, "invalid_type")
        out.append({"role": role, "content": _content(m, i)})
    return out


def check_contents(tokenize, messages, unknown):
    """Each message's content read by `tokenize` (a Model's) with the rule `unknown`, as
    the written prompt will be: a character it refuses raises its MoasError with the
    message named ("messages[1].content: ...", the offset within that message)."""
    for i, m in enumerate(messages):
        try:
            tokenize(m["content"], unknown=unknown)
        except MoasError as e:
            raise MoasError(e.status, "messages[%d].content: %s" % (i, e.message)) \
                from None


class ChatTemplate:
    """How a conversation becomes the prompt the model continues. The models here are
    character models with no chat template in their files, so the package has one of
    its own, in plain text any vocabulary of letters can write:

        system: You are terse.
        user: Who begat Enos?
        assistant: Seth.
        user: And Enos?
        assistant: 

    Each message is its role, ": ", its content and a newline ("developer" is written as
    "system", as OpenAI takes it); the prompt ends with "assistant: " for the answer,
    which ends where the model writes a newline followed by a role's label (a stop
    string of the template's, added to the caller's own and never part of the text)."""

    ROLES = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant"}
    ANSWER = "assistant: "

    def __init__(self):
        labels = sorted(set(self.ROLES.values()))
        self.stop = ["\n%s:" % r for r in labels]
        # every character the template itself writes, for the check against a vocabulary
        self.text = "".join("%s: \n" % r for r in labels)

    def missing(self, vocab):
        """The characters the template writes that the vocabulary `vocab` (a list of
        token texts) has not, sorted: none for a model that can hold a conversation."""
        return sorted(set(self.text) - set(vocab))

    def unavailable(self, vocab):
        """Why a model of the vocabulary `vocab` cannot hold a conversation, or None."""
        missing = self.missing(vocab)
        return None if not missing else (
            "this model's vocabulary has no %s, which the chat template writes"
            % ", ".join(json.dumps(c) for c in missing))

    def render(self, messages):
        return "".join("%s: %s\n" % (self.ROLES[m["role"]], m["content"])
                       for m in messages) + self.ANSWER
