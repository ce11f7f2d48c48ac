"""Preference alignment: the session reward model (``reward``) and the IPA rounds' pairs
(``ipa``) that the continuous trainer's DPO rounds use."""
