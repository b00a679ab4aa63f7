from flax_gpt.cli import main

raise SystemExit(main())
