"""What SFTTrainer.__init__ builds before Trainer's own constructor, as plain functions: the config
(`build.config`), the model (`build.model`), the tokenizer (`build.tokenizer`), the datasets
(`build.data`) and the default collator (`build.collator`)."""
