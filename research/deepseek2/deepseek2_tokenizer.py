"""DeepSeek-V2 tokenizer for MindFormers, and the DeepSeek-V2-Chat prompt format.

The released DeepSeek-V2 tokenizer is a byte-level BPE stored as a HuggingFace ``tokenizer.json``; its special
tokens are ``<｜begin▁of▁sentence｜>`` (bos) and ``<｜end▁of▁sentence｜>`` (eos). Note the full-width bars
(U+FF5C) and the "▁" (U+2581) instead of spaces.

``DeepseekV2Tokenizer`` is registered as a MindFormers TOKENIZER, so a YAML can build it::

    processor:
      tokenizer:
        type: DeepseekV2Tokenizer
        tokenizer_file: /path/to/tokenizer.json

Like the released ``tokenizer_config.json`` (``add_bos_token: true``, ``add_eos_token: false``), encoding with
``add_special_tokens=True`` (the default of ``tokenizer(text)`` and ``tokenizer.encode``) puts bos in front.
Texts that already carry the bos string (``build_chat_prompt(..., bos=True)``) must be encoded with
``add_special_tokens=False``; for ``TextGenerationPipeline`` pass ``build_chat_prompt(msg, bos=False)``.
"""
import os
from typing import Optional, Tuple

from tokenizers import Tokenizer, processors

from mindformers.models.tokenization_utils_fast import PreTrainedTokenizerFast
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from research.deepseek2.fileio import atomic_write_text

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "TOKENIZER_FILE", "DeepseekV2Tokenizer", "build_chat_prompt"]

BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # <｜begin▁of▁sentence｜>
EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"    # <｜end▁of▁sentence｜>
TOKENIZER_FILE = "tokenizer.json"

# DeepSeek-V2-Chat turn markers (released chat_template):
#   bos + "User: " + message + "\n\n" + "Assistant: " + reply + eos ; a generation prompt ends with "Assistant:".
_USER_PREFIX = "User: "
_USER_SUFFIX = "\n\n"
_ASSISTANT_TAG = "Assistant:"


def build_chat_prompt(message: str, reply: Optional[str] = None, bos: bool = True) -> str:
    """Format one DeepSeek-V2-Chat turn; the single place where the chat format is defined.

    Args:
        message: the user message.
        reply: the assistant reply. None gives a generation prompt ending with "Assistant:"; a string gives the
            training text ``... "Assistant: " + reply + eos``.
        bos: prepend the bos token string.

    Returns:
        ``[bos]User: {message}\\n\\nAssistant:`` or ``[bos]User: {message}\\n\\nAssistant: {reply}<eos>``.
    """
    if not isinstance(message, str):
        raise TypeError(f"build_chat_prompt: message must be a str, got {type(message).__name__}")
    if reply is not None and not isinstance(reply, str):
        raise TypeError(f"build_chat_prompt: reply must be a str or None, got {type(reply).__name__}")
    text = (BOS_TOKEN if bos else "") + _USER_PREFIX + message + _USER_SUFFIX + _ASSISTANT_TAG
    if reply is not None:
        text += " " + reply + EOS_TOKEN
    return text


def _load_backend(tokenizer_file) -> Tokenizer:
    """Load a HF tokenizer.json, with errors that name the file."""
    if tokenizer_file is None:
        raise ValueError("DeepseekV2Tokenizer: `tokenizer_file` is not set; expected the path of a HuggingFace "
                         "tokenizer.json (e.g. processor.tokenizer.tokenizer_file in the YAML).")
    path = os.fspath(tokenizer_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepseekV2Tokenizer: tokenizer_file '{path}' does not exist or is not a file "
                                f"(expected a HuggingFace tokenizer.json).")
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # the tokenizers library raises plain Exception subclasses
        raise ValueError(f"DeepseekV2Tokenizer: cannot parse tokenizer_file '{path}' as a HuggingFace "
                         f"tokenizer.json: {err}") from err


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class DeepseekV2Tokenizer(PreTrainedTokenizerFast):
    """DeepSeek-V2 byte-level BPE tokenizer loaded from a HuggingFace ``tokenizer.json``.

    Args:
        tokenizer_file: path of ``tokenizer.json`` (``vocab_file`` is accepted as an alias, as MindFormers YAMLs
            usually say ``vocab_file``).
        bos_token / eos_token: special token strings; both must exist in the file.
        pad_token: padding token; None uses the file's padding token if it defines one, else eos.
        add_bos_token / add_eos_token: what ``add_special_tokens=True`` adds around a sequence.
        clean_up_tokenization_spaces: False keeps ``decode(encode(x)) == x`` for byte-level BPE.
    """

    # Empty on purpose: MindFormers' build_tokenizer demands a `vocab_file` entry in the YAML for classes that
    # declare vocab files; this class takes `tokenizer_file` instead.
    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self,
                 tokenizer_file: Optional[str] = None,
                 bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN,
                 pad_token: Optional[str] = None,
                 unk_token: Optional[str] = None,
                 add_bos_token: bool = True,
                 add_eos_token: bool = False,
                 clean_up_tokenization_spaces: bool = False,
                 vocab_file: Optional[str] = None,
                 **kwargs):
        backend = kwargs.pop("tokenizer_object", None)
        if backend is None:
            tokenizer_file = tokenizer_file if tokenizer_file is not None else vocab_file
            backend = _load_backend(tokenizer_file)
        source = tokenizer_file if tokenizer_file is not None else "<tokenizer_object>"
        for role, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if backend.token_to_id(str(token)) is None:
                raise ValueError(f"DeepseekV2Tokenizer: {role} {str(token)!r} is not in the vocabulary of "
                                 f"'{source}'.")
        if pad_token is not None:
            kwargs["pad_token"] = pad_token
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        super().__init__(tokenizer_object=backend,
                         bos_token=bos_token,
                         eos_token=eos_token,
                         unk_token=unk_token,
                         add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)
        self.tokenizer_file = tokenizer_file
        if self.pad_token is None:
            # the released tokenizer has no pad token: pad with eos (the loss masks padding anyway)
            self.pad_token = self.eos_token
        self.update_post_processor()

    @property
    def add_bos_token(self) -> bool:
        """Whether ``add_special_tokens=True`` prepends bos."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool):
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        """Whether ``add_special_tokens=True`` appends eos."""
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool):
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self):
        """Make the backend add bos/eos (per ``add_bos_token``/``add_eos_token``) when special tokens are on."""
        bos, eos = str(self.bos_token), str(self.eos_token)
        head = [f"{bos}:0"] if self._add_bos_token else []
        tail = [f"{eos}:0"] if self._add_eos_token else []
        single = head + ["$A:0"] + tail
        pair = single + [s.replace(":0", ":1") for s in head] + ["$B:1"] + [s.replace(":0", ":1") for s in tail]
        special = []
        if self._add_bos_token:
            special.append((bos, self.bos_token_id))
        if self._add_eos_token:
            special.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=special)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """Add bos/eos around id lists the way ``add_special_tokens=True`` does."""
        bos = [self.bos_token_id] if self._add_bos_token else []
        eos = [self.eos_token_id] if self._add_eos_token else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output += bos + list(token_ids_1) + eos
        return output

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        """Write the backend as ``[prefix-]tokenizer.json`` in `save_directory` (atomically); returns its path.

        Used by ``save_pretrained(directory, save_json=True)``; ``from_pretrained(directory)`` reads it back.
        """
        if not os.path.isdir(save_directory):
            raise ValueError(f"DeepseekV2Tokenizer.save_vocabulary: '{save_directory}' is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_FILE
        path = os.path.join(save_directory, name)
        atomic_write_text(path, self._tokenizer.to_str())
        return (path,)
